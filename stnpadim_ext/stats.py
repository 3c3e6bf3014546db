"""Streaming per-patch Gaussian statistics (GaussianStats) and the fitted model (PatchGaussian).

PaDiM fits one Gaussian per patch position. The usual implementations keep every training
embedding and then compute covariances, which costs tens of GB on real data sets;
GaussianStats folds each batch into fixed-size float64 statistics instead (count, mean and
the scatter matrix, combined with Chan et al.'s pairwise update, which stays accurate when
the mean is large compared with the spread) and keeps the symmetric scatter packed. Peak
memory depends on P and C only, never on the number of images.
"""
from __future__ import annotations

import math
import numbers

import torch

from .errors import InputError
from .ops.mahalanobis import as_patches

# Bound on the float64 temporaries ([chunk, C, C]) of update and finalize, per device. A
# CPU wants them cache-sized; on a GPU every chunk costs a dozen kernel launches, and at
# the CPU's size a chunk is one patch for C = 550 (~123k launches per update of 4 images).
_CHUNK_BYTES = 4 * 2**20
_GPU_CHUNK_BYTES = 256 * 2**20


def _tril_flat_index(dim: int, device, upper: bool = False) -> torch.Tensor:
    """Flat indices into a [C, C] matrix of the packed lower triangle (or its transpose)."""
    rows, cols = torch.tril_indices(dim, dim, device=device)
    return cols * dim + rows if upper else rows * dim + cols


def pack_lower(mat: torch.Tensor) -> torch.Tensor:
    """[P, C, C] -> [P, C(C+1)/2]: the lower triangle, row-major (row i holds j = 0..i)."""
    dim = mat.shape[-1]
    return mat.reshape(mat.shape[0], dim * dim)[:, _tril_flat_index(dim, mat.device)]


def unpack_lower(packed: torch.Tensor, dim: int, symmetric: bool = False) -> torch.Tensor:
    """[P, C(C+1)/2] -> [P, C, C], lower triangular (or the symmetric matrix it packs)."""
    out = packed.new_zeros(packed.shape[0], dim * dim)
    out[:, _tril_flat_index(dim, packed.device)] = packed
    if symmetric:
        out[:, _tril_flat_index(dim, packed.device, upper=True)] = packed
    return out.view(-1, dim, dim)


def _invert_lower(mat: torch.Tensor) -> torch.Tensor:
    """Inverses of lower-triangular matrices [N, n, n], by recursive 2 x 2 blocking.

    inv([[A, 0], [B, C]]) = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]: batched matmuls do the work.
    A batched solve_triangular makes one multi-threaded LAPACK call per matrix, which on a
    busy 2-core machine took 30 s for 3136 matrices of 100 x 100 (this: 2 s).
    """
    n = mat.shape[-1]
    if n <= 16:
        eye = torch.eye(n, dtype=mat.dtype, device=mat.device).expand_as(mat)
        return torch.linalg.solve_triangular(mat, eye, upper=False)
    h = n // 2
    a_inv, c_inv = _invert_lower(mat[:, :h, :h]), _invert_lower(mat[:, h:, h:])
    out = torch.zeros_like(mat)
    out[:, :h, :h] = a_inv
    out[:, h:, h:] = c_inv
    out[:, h:, :h] = -(c_inv @ (mat[:, h:, :h] @ a_inv))
    return out


def _chunk_bytes(device: torch.device) -> int:
    return _CHUNK_BYTES if device.type == "cpu" else _GPU_CHUNK_BYTES


def _patch_chunk(dim: int, device: torch.device) -> int:
    return max(1, _chunk_bytes(device) // (8 * dim * dim))


class PatchGaussian:
    """Fitted per-patch Gaussians: mean [P, C] and packed lower factor L of the precision.

    precision = L^T L (L is the inverse of the covariance's Cholesky factor), so the squared
    distance is ||L (x - mean)||^2. mean is float32; factor_packed holds row i of L (columns
    0..i) from offset i(i+1)/2, about half the size of a full inverse covariance, in float32
    or bfloat16 (half the bytes for the distance kernels to read; see with_factor_dtype).

    Args:
        mean (Tensor[P, C]): per-patch means.
        factor_packed (Tensor[P, C(C+1)/2]): packed lower factors, same device as mean.
    """

    def __init__(self, mean: torch.Tensor, factor_packed: torch.Tensor):
        if not (isinstance(mean, torch.Tensor) and isinstance(factor_packed, torch.Tensor)):
            raise InputError("PatchGaussian needs tensors for mean and factor_packed")
        if mean.dim() != 2 or mean.shape[0] < 1 or mean.shape[1] < 1:
            raise InputError(f"PatchGaussian mean must have shape [P, C], got {tuple(mean.shape)}")
        patches, dim = mean.shape
        if tuple(factor_packed.shape) != (patches, dim * (dim + 1) // 2):
            raise InputError(f"PatchGaussian factor_packed must have shape [P, C(C+1)/2] = "
                             f"[{patches}, {dim * (dim + 1) // 2}], got {tuple(factor_packed.shape)}")
        if mean.device != factor_packed.device:
            raise InputError(f"PatchGaussian mean is on {mean.device} but factor_packed on "
                             f"{factor_packed.device}")
        self.mean = mean.float()
        self.factor_packed = factor_packed if factor_packed.dtype == torch.bfloat16 else factor_packed.float()

    @property
    def num_patches(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    def factor(self) -> torch.Tensor:
        """The unpacked lower factor, Tensor[P, C, C]."""
        return unpack_lower(self.factor_packed, self.dim)

    def with_factor_dtype(self, dtype: torch.dtype) -> "PatchGaussian":
        """This model with factor_packed in `dtype` (torch.float32 or torch.bfloat16, rounded
        to nearest even); the mean is shared."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise InputError(f"factor dtype must be torch.float32 or torch.bfloat16; got {dtype}")
        return PatchGaussian(self.mean, self.factor_packed.to(dtype))

    def to(self, device) -> "PatchGaussian":
        return PatchGaussian(self.mean.to(device), self.factor_packed.to(device))

    def state_dict(self) -> dict:
        """Plain tensors only (safe for torch.load(weights_only=True))."""
        return {"mean": self.mean, "factor_packed": self.factor_packed}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PatchGaussian":
        missing = [k for k in ("mean", "factor_packed") if k not in state]
        if missing:
            raise InputError(f"PatchGaussian state is missing {', '.join(missing)}")
        return cls(state["mean"], state["factor_packed"])

    def __repr__(self) -> str:
        return f"PatchGaussian(num_patches={self.num_patches}, dim={self.dim}, device={self.mean.device})"


class GaussianStats:
    """Streaming per-patch count, mean and scatter matrix, in float64.

    Args:
        num_patches (int): P, patch positions (H * W of the embedding map).
        dim (int): C, embedding channels.
        device: where the statistics live; by default the device of the first embedding.

    On a CPU an update with NaN or Inf values is refused at once. On a GPU that check would
    wait for the device at every update, so it is made once, by finalize (and merge /
    all_reduce), and the statistics are not usable after such an update.

    Example:
        >>> stats = sp.GaussianStats(56 * 56, 100)
        >>> for batch in loader:
        ...     stats.update(embed(batch))            # [B, 100, 56, 56], then dropped
        >>> gaussian = stats.finalize(eps=0.01)
    """

    def __init__(self, num_patches: int, dim: int, device=None):
        if int(num_patches) < 1 or int(dim) < 1:
            raise InputError(f"GaussianStats needs num_patches >= 1 and dim >= 1, got "
                             f"{num_patches} and {dim}")
        self.num_patches, self.dim = int(num_patches), int(dim)
        self.device = torch.device(device) if device is not None else None
        self.count = 0
        self.mean = None       # Tensor[P, C] float64
        self.scatter = None    # Tensor[P, C(C+1)/2] float64: sum of (x - mean)(x - mean)^T, packed
        self._spatial = None   # emb.shape[2:] of the first update
        self._finite = None    # GPU: bool tensor, all updates so far finite (checked lazily)

    def _ensure_state(self, device) -> None:
        if self.mean is None:
            self.device = torch.device(device)
            self.mean = torch.zeros(self.num_patches, self.dim, dtype=torch.float64, device=device)
            self.scatter = torch.zeros(self.num_patches, self.dim * (self.dim + 1) // 2,
                                       dtype=torch.float64, device=device)

    def _check_emb(self, emb) -> torch.Tensor:
        if not isinstance(emb, torch.Tensor):
            raise InputError(f"emb must be a torch.Tensor, got {type(emb).__name__}")
        if emb.dim() not in (3, 4) or not emb.is_floating_point():
            raise InputError("emb must be a floating-point tensor [B, C, H, W] or [B, C, P], "
                             f"got {emb.dtype} of shape {tuple(emb.shape)}")
        x = as_patches(emb)
        if (x.shape[1], x.shape[2]) != (self.dim, self.num_patches):
            raise InputError(f"emb has C={x.shape[1]} channels and P={x.shape[2]} patches, "
                             f"expected C={self.dim}, P={self.num_patches}")
        if self._spatial is not None and tuple(emb.shape[2:]) != self._spatial:
            raise InputError(f"emb spatial shape {tuple(emb.shape[2:])} differs from the first "
                             f"update's {self._spatial}")
        finite = torch.isfinite(x).all()
        if x.device.type == "cpu":
            if not bool(finite):
                raise InputError("emb contains NaN or Inf values")
        else:
            self._finite = finite if self._finite is None else self._finite & finite.to(self._finite.device)
        return x

    def _check_finite(self) -> None:
        """Raises if a (GPU) update had NaN or Inf values; one device sync."""
        if self._finite is not None and not bool(self._finite):
            raise InputError("emb contains NaN or Inf values (in an update of these statistics)")

    def update(self, emb: torch.Tensor) -> "GaussianStats":
        """Folds a batch into the statistics; the batch is not kept.

        Args:
            emb (Tensor[B, C, H, W] or Tensor[B, C, P]): embeddings, any floating dtype.

        Returns:
            self
        """
        x = self._check_emb(emb)
        self._spatial = tuple(emb.shape[2:])
        n_b = x.shape[0]
        if n_b == 0:
            return self
        self._ensure_state(self.device or x.device)
        n_a, n = self.count, self.count + n_b
        shift_weight = math.sqrt(n_a * n_b / n)
        lower = _tril_flat_index(self.dim, self.device)
        step = _patch_chunk(self.dim, self.device)
        for p0 in range(0, self.num_patches, step):
            p1 = min(p0 + step, self.num_patches)
            # Chan et al.: scatter += scatter of the batch about its own mean
            # + n_a n_b / n * delta delta^T; the rank-one term rides along as one extra row.
            rows = torch.empty(p1 - p0, n_b + 1, self.dim, dtype=torch.float64, device=self.device)
            rows[:, :n_b].copy_(x[:, :, p0:p1].permute(2, 0, 1))                 # [pc, B, C]
            batch_mean = rows[:, :n_b].mean(1)
            delta = batch_mean - self.mean[p0:p1]
            rows[:, :n_b] -= batch_mean[:, None]
            rows[:, n_b] = shift_weight * delta
            outer = rows.transpose(1, 2) @ rows                                   # [pc, C, C]
            self.scatter[p0:p1] += outer.reshape(p1 - p0, -1)[:, lower]
            self.mean[p0:p1] += delta * (n_b / n)
        self.count = n
        return self

    def _add_shift(self, delta: torch.Tensor, weight: float) -> None:
        """scatter += weight * delta delta^T per patch (delta [P, C]), chunked."""
        rows, cols = torch.tril_indices(self.dim, self.dim, device=self.device)
        step = max(1, _chunk_bytes(self.device) // (8 * rows.numel()))
        for p0 in range(0, self.num_patches, step):
            d = delta[p0:p0 + step]
            self.scatter[p0:p0 + step] += weight * d[:, rows] * d[:, cols]

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        """Adds the statistics of another GaussianStats (another process, machine or split).

        Returns:
            self
        """
        if not isinstance(other, GaussianStats):
            raise InputError(f"merge needs a GaussianStats, got {type(other).__name__}")
        if (other.num_patches, other.dim) != (self.num_patches, self.dim):
            raise InputError(f"cannot merge statistics of P={other.num_patches}, C={other.dim} "
                             f"into P={self.num_patches}, C={self.dim}")
        if None not in (self._spatial, other._spatial) and self._spatial != other._spatial:
            raise InputError(f"cannot merge statistics of spatial shape {other._spatial} into "
                             f"{self._spatial}")
        other._check_finite()
        if other.count == 0:
            return self
        self._spatial = self._spatial or other._spatial
        self._ensure_state(self.device or other.device)
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean.to(self.device) - self.mean
        self.scatter += other.scatter.to(self.device)
        self._add_shift(delta, n_a * n_b / n)
        self.mean += delta * (n_b / n)
        self.count = n
        return self

    def all_reduce(self, group=None) -> "GaussianStats":
        """Combines the statistics of all processes of a torch.distributed group, in place.

        Every process ends with the statistics of all samples seen by any of them. Tensors
        live on the CPU for gloo and on the current CUDA device for nccl (when this process
        saw no data and no device was given).

        Returns:
            self
        """
        import torch.distributed as dist

        self._check_finite()
        if self.mean is None:
            nccl = dist.get_backend(group) == "nccl"
            self._ensure_state(self.device or (torch.device("cuda", torch.cuda.current_device())
                                               if nccl else torch.device("cpu")))
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        dist.all_reduce(count, group=group)
        total = int(count.item())
        if total == 0:
            return self
        mean = self.mean * self.count
        dist.all_reduce(mean, group=group)
        mean /= total
        # Moves each process's scatter to the global mean before the plain sum.
        self._add_shift(self.mean - mean, float(self.count))
        dist.all_reduce(self.scatter, group=group)
        self.mean, self.count = mean, total
        return self

    def _covariance(self, p0: int, p1: int, eps: float) -> torch.Tensor:
        cov = unpack_lower(self.scatter[p0:p1], self.dim, symmetric=True) / (self.count - 1)
        cov.diagonal(dim1=1, dim2=2).add_(eps)
        return cov

    def covariance(self, eps: float = 0.0) -> torch.Tensor:
        """Unbiased covariances + eps * I, Tensor[P, C, C] float64 (P * C * C * 8 bytes)."""
        self._require_samples()
        return self._covariance(0, self.num_patches, eps)

    def _require_samples(self) -> None:
        if self.count < 2:
            raise InputError(f"a covariance needs at least 2 samples, got {self.count}")

    def finalize(self, eps: float = 0.01) -> PatchGaussian:
        """The fitted model: covariance + eps * I (PaDiM's regularisation), factored.

        Args:
            eps (float): added to the covariance's diagonal, >= 0.

        Returns:
            PatchGaussian: float32 mean and packed lower factor of the precision.
        """
        number = isinstance(eps, numbers.Real) and not isinstance(eps, bool)
        if not (number and math.isfinite(eps) and eps >= 0):
            raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
        self._require_samples()
        self._check_finite()
        lower = _tril_flat_index(self.dim, self.device)
        packed = torch.empty(self.num_patches, lower.numel(), dtype=torch.float32, device=self.device)
        info = torch.empty(self.num_patches, dtype=torch.int32, device=self.device)
        step = _patch_chunk(self.dim, self.device)
        for p0 in range(0, self.num_patches, step):
            p1 = min(p0 + step, self.num_patches)
            chol, info[p0:p1] = torch.linalg.cholesky_ex(self._covariance(p0, p1, eps))
            packed[p0:p1] = _invert_lower(chol).reshape(p1 - p0, -1)[:, lower]
        # Checked once at the end (on a GPU each check waits for the device).
        bad = torch.nonzero(info)
        if bad.numel():
            raise InputError(f"the covariance of patch {int(bad[0, 0])} is not positive definite "
                             f"(eps={eps}); use a larger eps or more samples")
        return PatchGaussian(self.mean.float(), packed)

    def __repr__(self) -> str:
        return (f"GaussianStats(num_patches={self.num_patches}, dim={self.dim}, "
                f"count={self.count}, device={self.device})")
