"""Models: pretrained backbones, PaDiM and the Spatial Transformer (models.stn)."""
from .backbones import BACKBONES, build_backbone
from .padim import PaDiM, load

__all__ = ["BACKBONES", "build_backbone", "PaDiM", "load"]
