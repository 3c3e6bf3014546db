"""Image input handling, MVTec-format datasets and the synthetic generator."""
from .._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["iter_batches", "list_images", "load_image"], ".images"),
    **dict.fromkeys(["MVTEC_CATEGORIES", "MVTEC_TEXTURES", "Category", "TestItem", "TestSet",
                     "list_categories", "load_category", "load_mask"], ".mvtec"),
    **dict.fromkeys(["CATEGORIES", "DEFECTS", "POSE_MODES", "make_dataset"], ".synth"),
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
