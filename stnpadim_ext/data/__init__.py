"""Image input handling, MVTec-format datasets and the synthetic generator."""
from .images import iter_batches, load_image

__all__ = ["iter_batches", "load_image"]
