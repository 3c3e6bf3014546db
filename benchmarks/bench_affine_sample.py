"""affine_sample vs torch's affine_grid + grid_sample composition, side by side.

Run: `pytest benchmarks/bench_affine_sample.py --benchmark-enable`.

Anchor: `F.grid_sample(x, F.affine_grid(theta, ...))`, bilinear, zero padding, float32, on
the same device and threads. Cases: STN input images (B=32, 3x224x224) and feature maps
(B=32, 64x56x56); forward, forward + backward for x and theta, and forward + backward for
theta only (an STN's case: the images need no gradient). Gradients are taken with
torch.autograd.grad, so no .grad accumulation is timed.

Bytes are the minimum any implementation moves: read the input and write the output
(forward); plus read grad_output, write grad_input and read the input again (backward).
Sampling does a few dozen flops per output pixel, so flops are reported as 0.
"""
from __future__ import annotations

import pytest
import torch

from stnpadim_ext import _backend
from stnpadim_ext.ops.affine_sample import affine_sample, affine_sample_reference

CASES = {"B32-C3-224": (32, 3, 224, 224), "B32-C64-56": (32, 64, 56, 56)}
# rounds per kind of call: one forward on 2 CPU cores is ~5-20 ms, a backward ~3x that.
KINDS = {"fwd": 20, "fwd+bwd": 10, "fwd+bwd-theta": 10}
ROLES = {"ours": affine_sample, "anchor": affine_sample_reference}
HAS_CUDA = torch.cuda.is_available() and _backend.has_kernel("affine_sample", "cuda")
HAS_CPU = _backend.has_kernel("affine_sample", "cpu")


def _inputs(shape, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen)
    # Rotations, scales and shifts of an STN's size: every output row reads many input rows.
    theta = torch.eye(2, 3) + 0.1 * torch.randn(shape[0], 2, 3, generator=gen)
    return x.to(device), theta.to(device)


def _bytes(shape, kind):
    image = 4.0 * shape[0] * shape[1] * shape[2] * shape[3]
    return {"fwd": 2 * image, "fwd+bwd": 6 * image, "fwd+bwd-theta": 4 * image}[kind]


def _run(benchmark, device, case, kind, role):
    if role == "ours" and not (HAS_CUDA if device == "cuda" else HAS_CPU):
        pytest.skip("compiled affine_sample kernels not built")
    shape = CASES[case]
    x, theta = _inputs(shape, device)
    fn = ROLES[role]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if kind == "fwd":
        def call():
            out = fn(x, theta)
            sync()
            return out
    else:
        x_req = x.requires_grad_(kind == "fwd+bwd")
        theta_req = theta.requires_grad_()
        wrt = (x_req, theta_req) if kind == "fwd+bwd" else (theta_req,)
        grad = torch.ones(shape, device=device)

        def call():
            grads = torch.autograd.grad(fn(x_req, theta_req), wrt, grad)
            sync()
            return grads
    if role == "ours":  # both sides compute the same thing
        ours = call()
        ours = ours if isinstance(ours, tuple) else (ours,)
        for a, b in zip(ours, _anchor_result(x, theta, kind, shape, device), strict=True):
            # theta's gradient sums ~1e5 terms whose float32 rounding (of the sampling
            # points, on noise images) differs between the two: compare to its scale.
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 + 1e-2 * b.abs().max().item())
    name = f"affine_sample:{kind}-{case}" + ("-cuda" if device == "cuda" else "")
    benchmark.group = name
    benchmark.extra_info.update(role=role, case=name, flops=0.0, bytes=_bytes(shape, kind))
    rounds = KINDS[kind] * (4 if device == "cuda" else 1)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)


def _anchor_result(x, theta, kind, shape, device):
    xa, ta = x.detach().clone(), theta.detach().clone()
    if kind == "fwd":
        return (affine_sample_reference(xa, ta),)
    xa.requires_grad_(kind == "fwd+bwd")
    ta.requires_grad_()
    wrt = (xa, ta) if kind == "fwd+bwd" else (ta,)
    return torch.autograd.grad(affine_sample_reference(xa, ta), wrt, torch.ones(shape, device=device))


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(CASES))
def test_affine_sample_cpu(benchmark, case, kind, role):
    _run(benchmark, "cpu", case, kind, role)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(CASES))
def test_affine_sample_cuda(benchmark, case, kind, role):
    _run(benchmark, "cuda", case, kind, role)
