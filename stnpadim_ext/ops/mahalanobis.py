"""mahalanobis: per-patch distance of embeddings to a PatchGaussian.

The compiled kernels (CPU, CUDA) read each patch's packed precision factor once per batch
tile and never build a [P, B, C] temporary; `mahalanobis_reference` is the anomalib
formulation and the correctness oracle. Inference only: no gradients.
"""
from __future__ import annotations

import torch

from .. import _backend


def as_patches(emb: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] or [B, C, P] -> [B, C, P] (a view when possible)."""
    return emb.flatten(2) if emb.dim() == 4 else emb


def _result_dtype(emb: torch.Tensor) -> torch.dtype:
    return torch.float64 if emb.dtype == torch.float64 else torch.float32


def mahalanobis_reference(emb: torch.Tensor, gaussian) -> torch.Tensor:
    """The anomalib formulation, with the full inverse covariance rebuilt from the factor.

    Args:
        emb (Tensor[B, C, H, W] or Tensor[B, C, P]): embeddings.
        gaussian (PatchGaussian): the fitted model, P patches of dimension C.

    Returns:
        Tensor[B, P]: distances (not squared), float64 for float64 input, else float32.
    """
    dtype = _result_dtype(emb)
    e = as_patches(emb).permute(2, 0, 1).to(dtype)                  # [P, B, C]
    delta = e - gaussian.mean.to(dtype)[:, None, :]
    factor = gaussian.factor().to(dtype)                              # [P, C, C], precision = F^T F
    inv_cov = factor.transpose(1, 2) @ factor
    d2 = (delta @ inv_cov * delta).sum(-1)                            # [P, B]
    return d2.clamp_min(0).sqrt().T.contiguous()


def _check(emb, gaussian) -> None:
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"emb must be a torch.Tensor, got {type(emb).__name__}")
    if emb.dim() not in (3, 4) or not emb.is_floating_point():
        raise ValueError("emb must be a floating-point tensor [B, C, H, W] or [B, C, P], "
                         f"got {emb.dtype} of shape {tuple(emb.shape)}")
    if not (hasattr(gaussian, "mean") and hasattr(gaussian, "factor_packed")):
        raise TypeError(f"gaussian must be a PatchGaussian, got {type(gaussian).__name__}")
    channels, patches = emb.shape[1], as_patches(emb).shape[2]
    if (channels, patches) != (gaussian.dim, gaussian.num_patches):
        raise ValueError(f"emb has C={channels} channels and P={patches} patches but the "
                         f"gaussian was fitted for C={gaussian.dim}, P={gaussian.num_patches}")
    if emb.device != gaussian.mean.device:
        raise ValueError(f"emb is on {emb.device} but the gaussian is on {gaussian.mean.device}; "
                         "move one of them (gaussian.to(device))")
    if torch.is_grad_enabled() and (emb.requires_grad or gaussian.mean.requires_grad
                                    or gaussian.factor_packed.requires_grad):
        raise RuntimeError("mahalanobis is inference-only (no gradients): call it under "
                           "torch.no_grad() or pass emb.detach()")


def mahalanobis(emb: torch.Tensor, gaussian) -> torch.Tensor:
    """Distance of each patch embedding to its patch's Gaussian, fused and without temporaries.

    Args:
        emb (Tensor[B, C, H, W] or Tensor[B, C, P]): embeddings, any strides; float32,
            float64, float16 or bfloat16.
        gaussian (PatchGaussian): the fitted model (mean [P, C], packed precision factor in
            float32 or bfloat16).

    Returns:
        Tensor[B, P]: distances (not squared), float64 for float64 input, else float32
        (accumulated in float32; a bfloat16 factor is widened exactly as it is read).

    Example:
        >>> g = sp.GaussianStats(P, C).update(train_emb).finalize()
        >>> scores = sp.mahalanobis(test_emb, g)          # [B, P]
    """
    _check(emb, gaussian)
    patches = as_patches(emb)
    if _backend.use_extension("mahalanobis", patches):
        return torch.ops.stnpadim.mahalanobis.default(patches, gaussian.mean, gaussian.factor_packed)
    return mahalanobis_reference(patches, gaussian)


if _backend.HAS_EXT and hasattr(torch.ops.stnpadim, "mahalanobis"):
    @torch.library.register_fake("stnpadim::mahalanobis")
    def _mahalanobis_fake(emb, mean, factor_packed):
        torch._check(emb.dim() == 3, lambda: f"emb must have shape [B, C, P], got {tuple(emb.shape)}")
        torch._check(emb.dtype.is_floating_point, lambda: f"emb must be floating-point, got {emb.dtype}")
        batch, channels, patches = emb.shape
        torch._check(mean.dtype == torch.float32, lambda: f"mean must be float32, got {mean.dtype}")
        torch._check(factor_packed.dtype in (torch.float32, torch.bfloat16),
                     lambda: f"factor_packed must be float32 or bfloat16, got {factor_packed.dtype}")
        torch._check(tuple(mean.shape) == (patches, channels),
                     lambda: f"mean must have shape [P, C] = [{patches}, {channels}], got {tuple(mean.shape)}")
        torch._check(tuple(factor_packed.shape) == (patches, channels * (channels + 1) // 2),
                     lambda: "factor_packed must have shape [P, C(C+1)/2], got "
                             f"{tuple(factor_packed.shape)}")
        return emb.new_empty((batch, patches), dtype=_result_dtype(emb))
