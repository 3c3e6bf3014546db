"""PaDiM: model (public class), embedding (torch_model), anomaly maps, model files."""
from .model import PaDiM, load

__all__ = ["PaDiM", "load"]
