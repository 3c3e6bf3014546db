"""The public PaDiM model: fit on good images, score new ones, save, load.

PaDiM (Defard et al., 2020, https://arxiv.org/abs/2011.08785) models every patch position's
pretrained-CNN embedding as a Gaussian over the good training images and scores a test patch
by its Mahalanobis distance. Here the fit streams through `GaussianStats` (memory does not
grow with the number of images) and, with `stn=`, every image is first put in the STN's
canonical pose and its anomaly map brought back to the input frame.

Example:
    >>> model = PaDiM(backbone="efficientnet_lite0").fit("data/bottle/train/good")
    >>> model.calibrate("data/bottle/calibration/good", false_reject_rate=0.01)
    >>> scores, maps = model.predict(test_images)      # [B], [B, H, W]
    >>> model.decide(test_images).anomalous            # [B] bool, at the calibrated threshold
    >>> model.save("bottle.padim")
    >>> scores, maps = load("bottle.padim").predict(test_images)
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ...catalog import FACTOR_DTYPES, MAX_IMAGE_SIZE
from ...data.images import as_float, describe, iter_batches, iter_image_batches, list_images, resize
from ...devices import resolve_device
from ...distributed import collect
from ...distributed.shards import share_indices, share_of
from ...errors import InputError
from ...ops.affine_sample import affine_sample
from ...ops.mahalanobis import mahalanobis
from ...stats import GaussianStats, PatchGaussian
from ..backbones import BACKBONES, build_backbone
from ..stn import STN, compose, invert_theta
from ..stn.poses import posed_batches, sample_posed
from . import validate
from .anomaly_map import distance_to_map, out_of_view, to_input_frame
from .calibration import Calibration, Decisions, conformal_calibration, decide
from .export import export_onnx
from .serialization import read_model_file, write_model_file
from .torch_model import PadimEmbedding

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest blur sigma (model-input pixels): the paper's is 4; the kernel spans 8 sigma.
MAX_SIGMA = 64.0
# Images per backbone pass and statistics update while fitting, per device type: caps the
# activation and embedding memory whatever the loader's batch size (~5 MB per 256 px
# resnet18 image). A GPU has the memory, and small passes would leave it waiting on launches.
FIT_CHUNK = {"cpu": 4, "cuda": 32}
# Images whose embeddings are stacked before one GaussianStats update: a 4-image update
# runs its float64 outer products at a third of the speed of a 16-image one (CPU, P=1024,
# C=100: 26 vs 8.6 ms per image); 16 embeddings of a 256 px resnet18 are ~80 MB.
STATS_CHUNK = {"cpu": 16, "cuda": 32}


class PaDiM:
    """PaDiM anomaly detector, optionally behind a Spatial Transformer.

    Args:
        backbone: "efficientnet_lite0" (weights ship with the package: works offline),
            "resnet18" or "wide_resnet50_2" (the paper's; torchvision's ImageNet weights
            from torch.hub's cache, downloaded into it on first use unless
            STNPADIM_OFFLINE=1, or `weights`).
        pretrained: load ImageNet weights (False: random init, explicitly).
        weights: a backbone state-dict file to use instead of the default weights.
        n_features: embedding channels kept (random fixed subset); default 100 for resnet18
            and efficientnet_lite0, 550 for wide_resnet50_2.
        image_size: side (or (H, W)) every image is resized to before the backbone,
            32..MAX_IMAGE_SIZE (1024).
        stn: an `stnpadim_ext.STN` (or any module x -> (aligned, theta)); images are
            aligned before the backbone at fit and predict time, maps are warped back.
        device: "cpu", "cuda", "cuda:N" or a torch.device; default CUDA when available.
        center_crop: crop this side (or (H, W)) from the centre after resizing: the PaDiM
            paper's pre-processing is image_size=256, center_crop=224. Map pixels outside
            the crop take the value of the nearest pixel inside it.
        batch_size: images per forward pass for tensors and path lists.
        backbone_dtype: "float32" (default), "float16" or "bfloat16": backbone compute
            precision; statistics and distances stay float32/float64. bfloat16 suits GPUs
            and CPUs with AVX512-BF16/AMX; it is not the CPU default because it moved one
            synthetic category's image AUROC by 0.0098 (README, Performance).
        factor_dtype: "float32" (default) or "bfloat16": storage of the precision factor
            the distances read (accumulation stays float32). bfloat16 halves the bytes per
            image, what bounds scoring at small batches, and keeps a bfloat16 copy beside
            the float32 factor (saved files and ONNX exports keep float32). Off by default:
            over 72 synthetic runs distances moved by at most 8e-4 (relative), but one image
            AUROC by 0.0052 (one good/defective pair of 192 swapped), beyond the 0.002 bound
            (README, Performance).
        seed: seed of the random channel subset.
        eps: covariance regulariser (cov + eps * I), 0.01 as in the paper.
        sigma: Gaussian blur of the anomaly map in model-input pixels, 4 as in the paper
            (0 < sigma <= 64).
        progress: show tqdm bars.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", pretrained: bool = True, weights=None,
                 n_features: int | None = None, image_size: int | tuple[int, int] = 256,
                 stn: nn.Module | None = None, device=None, *,
                 center_crop: int | tuple[int, int] | None = None, batch_size: int = 32,
                 backbone_dtype: str | None = None, factor_dtype: str = "float32", seed: int = 0,
                 eps: float = 0.01,
                 sigma: float = 4.0, progress: bool = True):
        if not isinstance(backbone, str) or backbone not in BACKBONES:
            raise InputError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.image_size = _pair(image_size, "image_size")
        self.center_crop = None if center_crop is None else _pair(center_crop, "center_crop")
        if self.center_crop and any(c > s for c, s in zip(self.center_crop, self.image_size, strict=True)):
            raise InputError(f"center_crop {self.center_crop} is larger than image_size {self.image_size}")
        if n_features is not None:
            n_features = _integer(n_features, "n_features", 1)
        if backbone_dtype not in (None, *DTYPES):
            raise InputError(f"backbone_dtype must be one of {', '.join(DTYPES)}; got {backbone_dtype!r}")
        self.device = resolve_device(device)
        self.batch_size, self.progress = _integer(batch_size, "batch_size", 1), progress
        self.backbone_dtype = backbone_dtype or "float32"
        self.factor_dtype = factor_dtype
        self.seed = _integer(seed, "seed", 0)
        self.eps = _number(eps, "eps", 0.0, math.inf, low_open=False)
        self.sigma = _number(sigma, "sigma", 0.0, MAX_SIGMA, low_open=True)
        self.backbone_name = backbone
        self.embedding = PadimEmbedding(build_backbone(backbone, pretrained, weights), n_features,
                                        self.seed, DTYPES[self.backbone_dtype]).to(self.device)
        self.stn = None if stn is None else stn.to(self.device).eval()
        self.gaussian: PatchGaussian | None = None
        self.grid: tuple[int, int] | None = None
        self.calibration: Calibration | None = None
        self._scoring: tuple[PatchGaussian, PatchGaussian] | None = None  # (gaussian, its copy)

    @property
    def factor_dtype(self) -> str:
        """Storage of the precision factor the distances read: "float32" or "bfloat16"."""
        return self._factor_dtype

    @factor_dtype.setter
    def factor_dtype(self, value: str) -> None:
        if value not in FACTOR_DTYPES:
            raise InputError(f"factor_dtype must be one of {', '.join(FACTOR_DTYPES)}; got {value!r}")
        self._factor_dtype = value

    def _scoring_gaussian(self) -> PatchGaussian:
        """The Gaussians the distances read: self.gaussian, or its copy in factor_dtype (made
        once per fitted model)."""
        if self.factor_dtype == "float32":
            return self.gaussian
        if self._scoring is None or self._scoring[0] is not self.gaussian:
            self._scoring = (self.gaussian, self.gaussian.with_factor_dtype(DTYPES[self.factor_dtype]))
        return self._scoring[1]

    @property
    def n_features(self) -> int:
        return self.embedding.n_features

    @property
    def threshold(self) -> float | None:
        """Calibrated anomaly threshold for image scores and map pixels; None if uncalibrated."""
        return None if self.calibration is None else self.calibration.threshold

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the backbone sees: the crop when center_crop is set, else image_size."""
        return self.center_crop or self.image_size

    @property
    def config(self) -> dict:
        """JSON-serialisable settings that rebuild this model (with its tensors)."""
        return {"backbone": self.backbone_name, "n_features": self.n_features,
                "image_size": list(self.image_size),
                "center_crop": list(self.center_crop) if self.center_crop else None,
                "seed": self.seed, "eps": self.eps, "sigma": self.sigma,
                "grid": list(self.grid) if self.grid else None,
                "stn": None if self.stn is None else _stn_config(self.stn),
                "stn_training": None if self.stn is None else getattr(self.stn, "record", None),
                "calibration": None if self.calibration is None else self.calibration.to_config()}

    # ------------------------------------------------------------------ pre-processing

    def _prepare(self, x: torch.Tensor, pose: torch.Tensor | None = None,
                 view: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images [B, 3, H, W] (float in [0, 1] or uint8) -> (backbone input [B, 3,
        *input_size], theta back or None).

        theta back maps input-frame normalised coordinates to the backbone input's (the
        inverse of STN alignment followed by the crop), for `to_input_frame`. A known
        `pose` [B, 2, 3] takes the STN's place; with a `view` [B, 2, 3] the input frame is
        that of x seen in pose `view` (see predict_batch).
        """
        x = resize(as_float(x, self.device), self.image_size)
        if view is not None:
            view = view.to(x.device, x.dtype)
            if pose is not None:  # the true pose of the seen image
                pose = compose(invert_theta(view), pose.to(x.device, x.dtype))
            elif self.stn is None:  # pose augmentation: the backbone sees the posed view
                return self._crop_or_not(affine_sample(x, view, padding_mode="border"), None)
            else:
                pose = self.stn.predict_theta(affine_sample(x, view, padding_mode="border"))
            padding = "border" if self.stn is None else self.stn.config["padding_mode"]
            return self._crop_or_not(sample_posed(x, view, pose, padding), invert_theta(pose))
        theta = None
        if pose is not None:
            forward_theta = pose.to(x.device, x.dtype)
            x = affine_sample(x, forward_theta, padding_mode="border")
            theta = invert_theta(forward_theta)
        elif self.stn is not None:
            x, forward_theta = self.stn(x)
            theta = invert_theta(forward_theta)
        return self._crop_or_not(x, theta)

    def _crop_or_not(self, x: torch.Tensor, theta: torch.Tensor | None):
        return (x, theta) if self.center_crop is None else self._crop(x, theta)

    def _crop(self, x: torch.Tensor, theta: torch.Tensor | None):
        (height, width), (ch, cw) = self.image_size, self.center_crop
        top, left = (height - ch) // 2, (width - cw) // 2
        # The crop in normalised coordinates: a = centre + scale * u (u: crop coordinates).
        scale = x.new_tensor([cw / width, ch / height])
        centre = x.new_tensor([(2 * left + cw) / width - 1, (2 * top + ch) / height - 1])
        if theta is None:
            theta = torch.cat([torch.eye(2, device=x.device), torch.zeros(2, 1, device=x.device)], 1)
            theta = theta.expand(x.shape[0], 2, 3)
        theta = torch.cat([theta[:, :, :2], theta[:, :, 2:] - centre[:, None]], 2) / scale[:, None]
        return x[:, :, top:top + ch, left:left + cw], theta

    # ------------------------------------------------------------------ fit

    def fit(self, images, pose_ranges: dict | None = None, n_views: int | None = None,
            seed: int = 0, poses: dict | None = None, *, shard: bool = False) -> "PaDiM":
        """Fits the per-patch Gaussians on good images, streaming (no embeddings kept).

        With torch.distributed initialised, each process passes its own share of the images
        (e.g. a DistributedSampler), or all of them with `shard`, and the statistics are
        summed over all processes, so every process ends with the same model.

        Args:
            images: tensor [B, 3, H, W] (float in [0, 1] or uint8), paths, a folder, or a
                DataLoader / iterable of such tensors (or tuples/dicts whose first/"image"
                item is one).
            pose_ranges: None, or {"rotation", "translation", "scale"} ranges: fit on the
                images seen in random poses within them (stn.poses), `n_views` views.
                Without an STN that is pose augmentation; behind an STN the Gaussians see
                what it makes of parts in such poses (its residual errors and the corners
                it turns out of view), each alignment read once from the original image.
            n_views: views to fit on (cycling through the images, held in memory); None:
                each image once.
            seed: seeds the views.
            poses: {path: theta [2, 3]} known true poses of the images (paths), used
                instead of the STN (the STN experiments' oracle).
            shard: every process of the torch.distributed group passes the same images (a
                list of paths, a folder or a tensor) and fits on its share: every world-th
                batch (or batch of views) from its rank, each as one process would see it
                (distributed.shards). The model then equals one process's up to the float64
                summation order of the statistics. Without a group: all of them.

        Returns:
            self.
        """
        grid = self.embedding.grid_size(*self.input_size)
        distributed = dist.is_available() and dist.is_initialized()
        stats = GaussianStats(grid[0] * grid[1], self.n_features, device=self.device)
        part = collect.shard() if shard else None
        if part is not None:
            images = self._listed(images)
        batches, total = None, n_views
        if (pose_ranges, n_views, poses) != (None, None, None) or part is not None:
            batches = posed_batches(images, pose_ranges, seed, self.batch_size, self.image_size,
                                    n_views, poses, self.device, shard=part)
        if part is not None:
            total = len(share_indices(n_views or len(images), self.batch_size, part))
        self._accumulate(images, stats, allow_empty=distributed, batches=batches, total=total)
        if distributed:
            stats.all_reduce()
        if stats.count < 2:  # a covariance needs two samples
            raise InputError(f"{describe(images)}: PaDiM needs at least 2 good images to fit; "
                             f"got {stats.count}")
        try:
            self.gaussian, self.grid = stats.finalize(self.eps), grid
        except InputError as exc:  # NaN features (found here on a GPU), singular covariance
            raise InputError(f"{describe(images)}: {exc}") from None
        self.calibration = None  # a threshold belongs to the Gaussians it was computed with
        return self

    def calibrate(self, good_images, false_reject_rate: float = 0.01, pose_ranges: dict | None = None,
                  seed: int = 0, poses: dict | None = None, *, shard: bool = False) -> "PaDiM":
        """Sets the threshold from good images the model was not fitted on (conformal).

        The threshold is the ceil((n + 1)(1 - false_reject_rate))-th smallest score of the n
        images: a new good image exchangeable with them is rejected with probability at
        most false_reject_rate (see calibration.py). When n is too small for the rate, the
        largest score is used and a warning says which rate n supports. STN included: the
        images are scored by the whole model.

        Args:
            good_images: as for `fit`, defect-free and not used by `fit` (nor to train the STN).
            false_reject_rate: target rate of good images called anomalous, in (0, 1).
            pose_ranges: None, or {"rotation", "translation", "scale"} ranges (an STN's
                declared range, `stn.record["ranges"]`): every image is first turned into
                a random pose within them (border padding). The guarantee then holds for
                good parts whose poses are drawn from that range (exchangeable with the
                posed calibration images), not for the images' own poses. Held-out
                training images of a model whose test parts drift need this; real line
                images in their real poses do not.
            seed: seeds those poses.
            poses: {path: theta} known true poses of the images, as for `fit`.
            shard: every process of the torch.distributed group passes the same images,
                scores its share (as `fit`'s) and gathers all the scores: every process
                sets the threshold of all the images.

        Returns:
            self.
        """
        part = collect.shard() if shard else None
        if part is not None:
            good_images = self._listed(good_images)
        if pose_ranges is None and poses is None and part is None:
            scores, _ = self.predict(good_images)
        elif pose_ranges is None and poses is None:
            mine = share_of(good_images, self.batch_size, part)
            scores = self.predict(mine)[0] if len(mine) else torch.empty(0)
        else:
            scores = [self.predict_batch(x, pose=pose, view=view)[0].cpu() for x, view, pose in
                      posed_batches(good_images, pose_ranges, seed, self.batch_size, self.image_size,
                                    poses=poses, device=self.device, shard=part)]
            scores = torch.cat(scores) if scores else torch.empty(0)
        if part is not None:
            scores = collect.gather_tensor_in_order(scores, self.batch_size)
        self.calibration = conformal_calibration(scores, false_reject_rate, pose_ranges)
        if self.calibration.note:
            warnings.warn(self.calibration.note, stacklevel=2)
        return self

    @staticmethod
    def _listed(images):
        """images as a list of paths or a tensor: what a rank can take its share of."""
        if isinstance(images, (str, os.PathLike)):
            images = list_images(images) if Path(images).is_dir() else [Path(images)]
        if isinstance(images, torch.Tensor) and images.dim() == 4 or isinstance(images, (list, tuple)):
            return images
        raise InputError(f"shard=True needs images as a list of paths, a folder or a tensor "
                         f"[B, 3, H, W]; got {type(images).__name__}")

    @torch.no_grad()
    def _accumulate(self, images, stats: GaussianStats, allow_empty: bool, batches=None,
                    total: int | None = None) -> None:
        # A method of its own so that the last batch is freed before finalize (peak memory).
        # Images are resized as they load: a training folder may mix sizes.
        if batches is None:
            batches = ((batch, None, None) for batch in iter_batches(
                images, self.batch_size, self.image_size, allow_empty, device=self.device))
        pending = []

        def flush():
            try:
                stats.update(torch.cat(pending))
            except InputError as exc:  # e.g. NaN features (CPU): name the input
                raise InputError(f"{describe(images)}: {exc}") from None
            pending.clear()

        stack = STATS_CHUNK.get(self.device.type, 16)
        with self._bar(images, "PaDiM fit", total) as bar:
            for batch, view, pose in batches:
                for part in self._prepare(batch, pose, view)[0].split(FIT_CHUNK.get(self.device.type, 4)):
                    pending.append(self.embedding(part))
                    if sum(e.shape[0] for e in pending) >= stack:
                        flush()
                bar.update(batch.shape[0])
        if pending:
            flush()

    # ------------------------------------------------------------------ predict

    def predict(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly scores and maps in each input image's own resolution.

        Args:
            images: as for `fit`; all images of one call must share one size.

        Returns:
            scores [N] (max of each map) and maps [N, H, W] (Mahalanobis distances, upsampled
            and blurred), float32 on the CPU.
        """
        scores, maps = [], []
        with self._bar(images, "PaDiM predict") as bar:
            # Files decode straight to image_size (the model resizes to it anyway); their
            # maps still come back at the files' own size.
            for batch in iter_image_batches(images, self.batch_size, file_size=self.image_size,
                                            device=self.device):
                batch_scores, batch_maps = self.predict_batch(batch.images, batch.source_size)
                # From a GPU: into pinned memory without waiting, so the next batch's work
                # overlaps the copy; synchronised once below.
                scores.append(batch_scores.to("cpu", non_blocking=True))
                maps.append(batch_maps.to("cpu", non_blocking=True))
                bar.update(batch.images.shape[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if len({tuple(m.shape[-2:]) for m in maps}) > 1:
            raise InputError("images of one predict call must share one size; got "
                             f"{sorted({tuple(m.shape[-2:]) for m in maps})}")
        return torch.cat(scores), torch.cat(maps)

    def decide(self, images) -> Decisions:
        """Scores, maps and decisions at the calibrated threshold.

        Args:
            images: as for `predict`.

        Returns:
            Decisions: scores [N], maps [N, H, W], normalized_scores [N] (score / threshold),
            anomalous [N] bool and masks [N, H, W] bool (map > threshold), in the input frame;
            the last three are None while the model is uncalibrated. Unpacks as (scores, maps).
        """
        scores, maps = self.predict(images)
        return decide(scores, maps, self.threshold)

    @torch.no_grad()
    def align(self, images: torch.Tensor) -> torch.Tensor:
        """What the backbone sees: images [B, 3, H, W] resized, STN-aligned and cropped,
        [B, 3, *input_size] on the CPU."""
        return self._prepare(images)[0].cpu()

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor, output_size: tuple[int, int] | None = None,
                      pose: torch.Tensor | None = None, view: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch -> (scores [B], maps [B, *output_size]) on the model's device.

        Args:
            x: images [B, 3, H, W], float in [0, 1] or uint8 (0..255).
            output_size: (H, W) of the maps; default x's (H, W).
            pose: optional known poses [B, 2, 3] (affine_grid matrices taking the canonical
                frame into each image, as synth's meta.json records them), used instead of
                the STN: images are aligned by them (border padding) and maps brought back.
                The "oracle" of the STN experiments.
            view: optional [B, 2, 3]: score x as seen in these poses (warp(x, view), border
                padding), the maps in that seen frame; the alignment is read once from x
                (stn.poses.sample_posed). What calibrate does with pose_ranges.
        """
        if self.gaussian is None:
            raise InputError("the model is not fitted: call fit(images) first (or load a saved model)")
        inputs, theta = self._prepare(x, pose, view)
        emb = self.embedding(inputs)
        if tuple(emb.shape[-2:]) != self.grid:
            raise InputError(f"embedding grid {tuple(emb.shape[-2:])} differs from the fitted {self.grid}")
        distance = mahalanobis(emb, self._scoring_gaussian())
        maps = distance_to_map(distance, self.grid, tuple(inputs.shape[-2:]), self.sigma)
        maps = to_input_frame(maps, tuple(output_size or x.shape[-2:]), theta)
        return maps.flatten(1).amax(1), maps

    @torch.no_grad()
    def out_of_view(self, x: torch.Tensor, pose: torch.Tensor | None = None) -> torch.Tensor:
        """The pixels of each image [B, H, W] (bool, CPU) that the model did not see: corners
        the STN turned out of the frame, the margin outside a centre crop. Their map values
        are filled from the nearest seen pixels, so a defect there is found only if it
        reaches into the view.

        Args:
            x: images [B, 3, H, W] in [0, 1].
            pose: known poses, as for predict_batch.
        """
        inputs, theta = self._prepare(x, pose)
        if theta is None:
            return torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
        return out_of_view(theta, tuple(inputs.shape[-2:]), tuple(x.shape[-2:])).cpu()

    def out_of_view_fraction(self, x: torch.Tensor, pose: torch.Tensor | None = None) -> torch.Tensor:
        """Share of each image's pixels [B] (CPU) that the model did not see (`out_of_view`)."""
        return self.out_of_view(x, pose).flatten(1).float().mean(1)

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the fitted model (config, channel subset, backbone, Gaussians, STN) to `path`."""
        if self.gaussian is None:
            raise InputError("the model is not fitted: nothing to save")
        tensors = {f"embedding.{k}": v for k, v in self.embedding.state_dict().items()}
        tensors.update({f"gaussian.{k}": v for k, v in self.gaussian.state_dict().items()})
        if self.stn is not None:
            tensors.update({f"stn.{k}": v for k, v in self.stn.state_dict().items()})
        return write_model_file(path, self.config, tensors)

    def export_onnx(self, path: str | os.PathLike, batch_size: int | None = None, *,
                    input_dtype: str = "float32", factor: str = "packed") -> Path:
        """Writes the whole predict path as one ONNX graph (see `export.export_onnx`).

        Input images [B, 3, H, W] (H, W = image_size; float32 in [0, 1], or uint8 with
        input_dtype="uint8"); outputs scores [B] and maps [B, H, W] equal to predict's, plus
        normalized_scores, anomalous and masks (as `decide`) when the model has a calibrated threshold.
        B is dynamic unless batch_size is given. Needs `pip install "stnpadim[export]"`.
        """
        return export_onnx(self, path, batch_size, input_dtype=input_dtype, factor=factor)

    def _bar(self, images, desc: str, total: int | None = None):
        if total is None:
            total = images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else (
                len(images) if isinstance(images, (list, tuple)) and all(
                    isinstance(p, (str, os.PathLike)) for p in images) else None)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return tqdm(total=total, desc=desc, unit="img", disable=not self.progress or rank != 0)


def load(path: str | os.PathLike, device=None, **options) -> PaDiM:
    """Reads a model written by `PaDiM.save`.

    Args:
        path: model file.
        device: where to run it (default CUDA when available).
        **options: run-time options of PaDiM (batch_size, backbone_dtype, factor_dtype,
            progress).
    """
    device = resolve_device(device)
    config, tensors = read_model_file(path)
    try:
        # Config and tensors are checked before anything large is built or any tensor used.
        validate.check_config(config)
        stn = None if config["stn"] is None else STN(**config["stn"])
        model = PaDiM(config["backbone"], pretrained=False, n_features=config["n_features"],
                      image_size=config["image_size"], stn=stn, device=device,
                      center_crop=config["center_crop"], seed=config["seed"],
                      eps=config["eps"], sigma=config["sigma"], **options)
        grid = model.embedding.grid_size(*model.input_size)
        if tuple(config["grid"]) != grid:
            raise InputError(f"config 'grid' {config['grid']} does not match the embedding grid "
                             f"{list(grid)} of its input size {list(model.input_size)}")
        groups = _split_prefixes(tensors, ("embedding.", "gaussian.", "stn."))
        validate.check_tensors(groups, {
            "embedding.": validate.module_shapes(model.embedding),
            "gaussian.": validate.gaussian_shapes(grid[0] * grid[1], model.n_features),
            "stn.": validate.module_shapes(model.stn)})
        validate.check_channel_subset(groups["embedding."]["idx"],
                                      sum(model.embedding.backbone.channels))
        validate.check_factor(groups["gaussian."]["factor_packed"], model.n_features)
        model.embedding.load_state_dict(groups["embedding."])
        if stn is not None:
            model.stn.load_state_dict(groups["stn."])
            model.stn.record = config.get("stn_training")
        model.gaussian = PatchGaussian.from_state_dict(groups["gaussian."]).to(model.device)
        model.grid = grid
        # Files written before calibration existed have no entry: they load uncalibrated.
        if config.get("calibration") is not None:
            model.calibration = Calibration.from_config(config["calibration"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # InputError is a ValueError
        first_line = (str(exc).splitlines() or [""])[0]
        kind = "" if isinstance(exc, InputError) else f"{type(exc).__name__}: "
        raise InputError(f"{path}: damaged stnpadim model file ({kind}{first_line})") from None
    return model


def _split_prefixes(tensors: dict, prefixes) -> dict[str, dict]:
    groups = {p: {} for p in prefixes}
    for name, tensor in tensors.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"unexpected tensor {name!r}")
        groups[prefix][name[len(prefix):]] = tensor
    return groups


def _stn_config(stn: nn.Module) -> dict:
    config = getattr(stn, "config", None)
    if not isinstance(config, dict):
        raise InputError(f"cannot save an STN of type {type(stn).__name__}: only stnpadim_ext.STN "
                         "(with its JSON .config) is stored in model files")
    return config


def _pair(value, name: str, minimum: int = 32, maximum: int = MAX_IMAGE_SIZE) -> tuple[int, int]:
    pair = (value, value) if _is_integer(value) else value
    if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            _is_integer(v) and minimum <= v <= maximum for v in pair):
        return int(pair[0]), int(pair[1])
    raise InputError(f"{name} must be an int or (H, W) pair of ints in {minimum}..{maximum}; "
                     f"got {value!r}")


def _integer(value, name: str, minimum: int) -> int:
    if not _is_integer(value) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _number(value, name: str, low: float, high: float, low_open: bool) -> float:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        bound += "" if high == math.inf else f" and <= {high}"
        raise InputError(f"{name} must be a finite number {bound}; got {value!r}")
    return float(value)


def _is_integer(value) -> bool:
    """int or numpy integer, not bool (True is not an image size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
