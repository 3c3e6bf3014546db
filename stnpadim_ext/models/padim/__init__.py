"""PaDiM: model (public class), embedding (torch_model), anomaly maps, calibration, model files."""
from .calibration import Calibration, Decisions
from .model import MAX_IMAGE_SIZE, PaDiM, load

__all__ = ["MAX_IMAGE_SIZE", "PaDiM", "load", "Calibration", "Decisions"]
