"""Small launches of every CUDA kernel variant, for compute-sanitizer (benchmarks/gpu_check.sh).

Each affine_sample mode, padding, align_corners and dtype runs forward and backward (input
and theta gradients, and the input gradient alone) on shapes that cover a 1-pixel axis and
a one-image many-channel map (channels split over grid.z); mahalanobis runs each dtype on
odd sizes and the opt-in shared-memory path (C=1600 float32, C=800 float64). Correctness
against torch is the CUDA tests' job: here few other kernels run, so that the sanitizer's
cost goes to ours, and each result is only checked to be finite and not all zero.
Prints "sanitize_ops: ok <launches>".

Run: compute-sanitizer --tool memcheck python3 benchmarks/sanitize_ops.py
"""
import itertools
import sys

import torch

import stnpadim_ext as sp
from stnpadim_ext import _backend
from stnpadim_ext.ops.affine_sample import affine_sample

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SHAPES = (((2, 3, 9, 11), (7, 8)), ((1, 70, 5, 6), (3, 4)), ((2, 2, 1, 7), (4, 1)))


def check(t: torch.Tensor, what) -> None:
    assert bool(torch.isfinite(t).all()) and bool(t.ne(0).any()), what


def affine_cases(gen) -> int:
    launches = 0
    for mode, padding, align, dtype in itertools.product(("bilinear", "nearest", "bicubic"),
                                                         ("zeros", "border", "reflection"),
                                                         (False, True), DTYPES):
        for shape, size in SHAPES:
            what = (mode, padding, align, dtype, shape)
            x = torch.rand(shape, generator=gen).to("cuda", dtype).requires_grad_()
            theta = (torch.eye(2, 3) + 0.2 * torch.randn(shape[0], 2, 3, generator=gen)).to("cuda", dtype)
            theta.requires_grad_()
            g = torch.rand(shape[0], shape[1], *size, generator=gen).to("cuda", dtype)
            out = affine_sample(x, theta, size, mode, padding, align)
            gx, gt = torch.autograd.grad(out, (x, theta), g)
            check(out, what)
            check(gx, what)
            (gx_only,) = torch.autograd.grad(affine_sample(x, theta.detach(), size, mode, padding, align), x, g)
            check(gx_only, what)
            assert bool(torch.isfinite(gt).all()), what
            launches += 5
    return launches


def mahalanobis_cases(gen) -> int:
    cases = [(dtype, size) for dtype in DTYPES for size in ((1, 5, 3), (9, 37, 4), (17, 100, 2))]
    cases += [(torch.float32, (10, 1600, 1)), (torch.float64, (10, 800, 1))]
    for dtype, (batch, dim, patches) in cases:
        x = torch.randn(2 * dim, dim, patches, generator=gen, dtype=torch.float64)
        gaussian = sp.GaussianStats(patches, dim).update(x).finalize().to("cuda")
        emb = torch.randn(batch, dim, patches, generator=gen).to("cuda", dtype)
        check(sp.mahalanobis(emb, gaussian), (dtype, batch, dim, patches))
    return len(cases)


def main() -> int:
    for op in ("affine_sample", "mahalanobis"):
        if not _backend.has_kernel(op, "cuda"):
            print(f"sanitize_ops: no CUDA kernel for {op}")
            return 1
    gen = torch.Generator().manual_seed(0)
    launches = affine_cases(gen) + mahalanobis_cases(gen)
    torch.cuda.synchronize()
    print(f"sanitize_ops: ok {launches}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
