"""stnpadim: PaDiM anomaly detection with a self-supervised Spatial Transformer Network.

    import stnpadim_ext as sp
    model = sp.PaDiM(backbone="efficientnet_lite0").fit(train_images)
    model.calibrate(held_out_good_images, false_reject_rate=0.01)
    scores, maps = model.predict(test_images)
    result = model.decide(test_images)       # .anomalous, .normalized_scores, .masks
"""
from ._lazy import lazy_exports

_EXPORTS = {
    "backend_info": "._backend",
    "affine_sample": ".ops.affine_sample",
    "mahalanobis": ".ops.mahalanobis",
    "GaussianStats": ".stats",
    "PatchGaussian": ".stats",
    "PaDiM": ".models.padim",
    "STN": ".models.stn",
    "train_stn": ".models.stn",
    "load": ".api",
    "score": ".api",
    "Decisions": ".api",
    "InputError": ".errors",
    "WeakSTNError": ".errors",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
