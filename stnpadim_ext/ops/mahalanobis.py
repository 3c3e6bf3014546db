"""mahalanobis: per-patch distance of embeddings to a PatchGaussian.

PLACEHOLDER (reference only) until the kernels land: the public signature is final.
"""
from __future__ import annotations

import torch


def as_patches(emb: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] or [B, C, P] -> [B, C, P] (a view when possible)."""
    return emb.flatten(2) if emb.dim() == 4 else emb


def mahalanobis_reference(emb, gaussian):
    """The anomalib formulation with the full inverse covariance rebuilt from the factor."""
    e = as_patches(emb).permute(2, 0, 1).float()            # [P, B, C]
    delta = e - gaussian.mean[:, None, :]
    factor = gaussian.factor()                                # [P, C, C] lower, precision = F^T F
    inv_cov = factor.transpose(1, 2) @ factor
    d2 = (delta @ inv_cov * delta).sum(-1)                    # [P, B]
    return d2.clamp_min(0).sqrt().T.contiguous()


def mahalanobis(emb: torch.Tensor, gaussian) -> torch.Tensor:
    """Distances (not squared) [B, P] float32 of emb [B, C, H, W] or [B, C, P]."""
    return mahalanobis_reference(emb, gaussian)
