"""PaDiM: model (public class), embedding (torch_model), anomaly maps, model files."""
from .model import MAX_IMAGE_SIZE, PaDiM, load

__all__ = ["MAX_IMAGE_SIZE", "PaDiM", "load"]
