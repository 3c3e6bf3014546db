"""Streaming per-patch Gaussian statistics (GaussianStats) and the fitted model (PatchGaussian).

PLACEHOLDER (simple version) until the streaming implementation lands: the API is final.
"""
from __future__ import annotations

import torch

from .ops.mahalanobis import as_patches


def pack_lower(mat: torch.Tensor) -> torch.Tensor:
    """[P, C, C] lower-triangular -> [P, C(C+1)/2], row-major rows (row i holds j = 0..i)."""
    c = mat.shape[-1]
    rows, cols = torch.tril_indices(c, c, device=mat.device)
    return mat[:, rows, cols]


def unpack_lower(packed: torch.Tensor, dim: int) -> torch.Tensor:
    rows, cols = torch.tril_indices(dim, dim, device=packed.device)
    out = packed.new_zeros(packed.shape[0], dim, dim)
    out[:, rows, cols] = packed
    return out


class PatchGaussian:
    """Fitted per-patch Gaussians: mean [P, C] and packed lower factor L of the precision.

    precision = L^T L, so the squared distance is ||L (x - mean)||^2.
    """

    def __init__(self, mean: torch.Tensor, factor_packed: torch.Tensor):
        self.mean = mean
        self.factor_packed = factor_packed

    @property
    def num_patches(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    def factor(self) -> torch.Tensor:
        """The unpacked lower factor [P, C, C]."""
        return unpack_lower(self.factor_packed, self.dim)

    def to(self, device) -> "PatchGaussian":
        return PatchGaussian(self.mean.to(device), self.factor_packed.to(device))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "factor_packed": self.factor_packed}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PatchGaussian":
        return cls(state["mean"], state["factor_packed"])


class GaussianStats:
    """Streaming count / sum / sum of outer products per patch, in float64."""

    def __init__(self, num_patches: int, dim: int, device=None):
        self.num_patches, self.dim = num_patches, dim
        self.count = 0
        self.sum = torch.zeros(num_patches, dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num_patches, dim, dim, dtype=torch.float64, device=device)

    def update(self, emb: torch.Tensor) -> "GaussianStats":
        e = as_patches(emb).permute(2, 0, 1).double()   # [P, B, C]
        self.count += e.shape[1]
        self.sum += e.sum(1)
        self.outer += e.transpose(1, 2) @ e
        return self

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def finalize(self, eps: float = 0.01) -> PatchGaussian:
        n = self.count
        mean = self.sum / n
        cov = (self.outer - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
        cov += eps * torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(cov)
        eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device).expand_as(cov)
        factor = torch.linalg.solve_triangular(chol, eye, upper=False)   # L_cov^-1
        return PatchGaussian(mean.float(), pack_lower(factor).float())
