"""Image input handling, MVTec-format datasets and the synthetic generator."""
from .images import iter_batches, list_images, load_image
from .mvtec import (
                    MVTEC_CATEGORIES,
                    MVTEC_TEXTURES,
                    Category,
                    TestItem,
                    TestSet,
                    list_categories,
                    load_category,
                    load_mask,
)
from .synth import CATEGORIES, DEFECTS, POSE_MODES, make_dataset

__all__ = ["iter_batches", "list_images", "load_image",
           "MVTEC_CATEGORIES", "MVTEC_TEXTURES", "Category", "TestItem", "TestSet",
           "list_categories", "load_category", "load_mask",
           "CATEGORIES", "DEFECTS", "POSE_MODES", "make_dataset"]
