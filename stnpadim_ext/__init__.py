"""stnpadim: PaDiM anomaly detection with a self-supervised Spatial Transformer Network.

    import stnpadim_ext as sp
    model = sp.PaDiM(backbone="efficientnet_lite0").fit(train_images)
    model.calibrate(held_out_good_images, false_reject_rate=0.01)
    scores, maps = model.predict(test_images)
    result = model.decide(test_images)       # .anomalous, .normalized_scores, .masks
"""
from ._backend import backend_info
from .api import Decisions, load, score
from .errors import InputError, WeakSTNError
from .models.padim import PaDiM
from .models.stn import STN, train_stn
from .ops.affine_sample import affine_sample
from .ops.mahalanobis import mahalanobis
from .stats import GaussianStats, PatchGaussian

__all__ = ["backend_info", "affine_sample", "mahalanobis", "GaussianStats", "PatchGaussian",
           "PaDiM", "STN", "train_stn", "load", "score", "Decisions", "InputError", "WeakSTNError"]
__version__ = "0.1.0"
