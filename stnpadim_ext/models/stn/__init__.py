"""Self-supervised Spatial Transformer Network that puts each part in one canonical pose."""
from .network import STN
from .train import DEFAULT_RANGES, measure_alignment, train_stn
from .transforms import (
                         affine_theta,
                         centring_theta,
                         compose,
                         identity_theta,
                         invert_theta,
                         random_similarity,
                         similarity_theta,
                         theta_pose,
)

__all__ = ["STN", "train_stn", "measure_alignment", "invert_theta", "compose",
           "similarity_theta", "affine_theta", "identity_theta", "random_similarity", "theta_pose",
           "centring_theta", "DEFAULT_RANGES"]
