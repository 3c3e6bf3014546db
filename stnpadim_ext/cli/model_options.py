"""ModelOptions: how a model is built and fitted, as the CLI's options say it. No torch
here, so that the parser can show the defaults without loading it."""
from __future__ import annotations

from dataclasses import dataclass, field

# Column labels of the arms, in table order.
PADIM, AUGMENTED, STN_PADIM, ORACLE = "PaDiM", "PaDiM+aug", "STN+PaDiM", "oracle"
# Their keys in results JSON beside the STN arm, which stays at the top level (DESIGN.md).
JSON_KEYS = {PADIM: "baseline", AUGMENTED: "augmented", ORACLE: "oracle"}

@dataclass(frozen=True)
class ModelOptions:
    """How a model is built and fitted (the `fit` options of the CLI).

    Attributes:
        backbone: PaDiM backbone name.
        weights: backbone state-dict file, or None for the default weights.
        stn: "reconstruct", "canonical" or "none" (plain PaDiM).
        stn_epochs: maximum STN training epochs, None for train_stn's default.
        stn_symmetry: the part's rotational symmetry order (train_stn's `symmetry`).
        accept_weak_stn: keep an STN that fails train_stn's check (with a warning)
            instead of stopping with WeakSTNError.
        image_size: square side images are resized to.
        center_crop: optional centre crop side after the resize.
        n_features: embedding channels, None for the backbone's default.
        seed: seeds the channel subset, the calibration hold-out and its poses, the STN's
            initial weights and its training, and PaDiM+aug's views.
        batch_size: images per forward pass.
        device: torch device string, None for the default.
        stn_train: further train_stn keyword arguments (e.g. samples_per_epoch, rotation).
        false_reject_rate: target false-reject rate of the calibrated threshold.
        pose_views: posed views the pose arms (and a fitted STN+PaDiM) fit on; None: as
            many as the STN's first try trains on (epochs x samples_per_epoch), up to
            experiment.MAX_VIEWS.
    """

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    stn: str = "reconstruct"
    stn_epochs: int | None = None
    stn_symmetry: int = 1
    accept_weak_stn: bool = False
    image_size: int = 256
    center_crop: int | None = None
    n_features: int | None = None
    seed: int = 0
    batch_size: int = 32
    device: str | None = None
    stn_train: dict = field(default_factory=dict)
    false_reject_rate: float = 0.01
    pose_views: int | None = None

    @classmethod
    def from_args(cls, args) -> "ModelOptions":
        """Options from parsed CLI arguments: attributes named like the fields; None (not
        given) keeps the default."""
        given = {k: getattr(args, k, None) for k in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in given.items() if v is not None})

    @property
    def label(self) -> str:
        """Column label: "PaDiM" or "STN+PaDiM"."""
        return PADIM if self.stn == "none" else STN_PADIM
