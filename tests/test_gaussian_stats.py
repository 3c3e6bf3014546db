"""GaussianStats / PatchGaussian: the streaming fit against np.cov, merging, all_reduce, errors."""
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stnpadim_ext as sp
from stnpadim_ext.errors import InputError

HAS_CUDA = torch.cuda.is_available()


def padim_reference(x, eps=0.01):
    """The PaDiM reference: per patch np.cov(rowvar=False) + eps * I on all samples. x [N, C, P]."""
    x = x.double().numpy()
    cov = np.stack([np.cov(x[:, :, p], rowvar=False) + eps * np.eye(x.shape[1])
                    for p in range(x.shape[2])])
    return x.mean(0).T, cov


def fit(x, batch, eps=0.01):
    stats = sp.GaussianStats(x.shape[2], x.shape[1])
    for start in range(0, len(x), batch):
        stats.update(x[start:start + batch])
    return stats


def embeddings(n, dim, patches, seed, offset=1e4):
    """Correlated data far from the origin: a naive sum of squares loses ~8 digits here."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(patches, dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    z = torch.randn(n, patches, dim, generator=g, dtype=torch.float64)
    return (offset + torch.einsum("pij,npj->nip", mix, z)).contiguous()  # [N, C, P]


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streaming_fit_matches_np_cov(dtype):
    x = embeddings(53, 9, 12, seed=1).to(dtype)
    stats = fit(x, batch=8)
    mean, cov = padim_reference(x)
    assert stats.count == 53
    assert rel(stats.mean.numpy(), mean) < 1e-12
    assert rel(stats.covariance(eps=0.01).numpy(), cov) < 1e-9

    g = stats.finalize(eps=0.01)
    assert g.mean.dtype == g.factor_packed.dtype == torch.float32
    assert g.factor_packed.shape == (12, 9 * 10 // 2)
    factor = g.factor().double().numpy()
    precision = np.einsum("pki,pkj->pij", factor, factor)
    assert rel(np.linalg.inv(precision), cov) < 1e-5
    assert rel(g.mean.double().numpy(), mean) < 1e-7
    assert np.allclose(np.triu(factor, 1), 0)


def test_image_shaped_and_non_contiguous_updates_agree():
    x = embeddings(20, 6, 12, seed=2)
    want = fit(x, batch=20).covariance()
    image = sp.GaussianStats(12, 6).update(x.view(20, 6, 3, 4)).covariance()
    strided = torch.empty(20, 12, 24, dtype=torch.float64)[:, ::2, ::2].copy_(x)
    channels_last = x.view(20, 6, 3, 4).to(memory_format=torch.channels_last)
    torch.testing.assert_close(image, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sp.GaussianStats(12, 6).update(strided).covariance(), want,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sp.GaussianStats(12, 6).update(channels_last).covariance(), want,
                               rtol=1e-12, atol=1e-12)


def test_merge_of_halves_equals_one_pass():
    x = embeddings(41, 7, 10, seed=3)
    one = fit(x, batch=41)
    a, b = fit(x[:17], batch=5), fit(x[17:], batch=6)
    merged = a.merge(b)
    assert merged is a and merged.count == 41
    torch.testing.assert_close(merged.mean, one.mean, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(merged.covariance(), one.covariance(), rtol=1e-10, atol=1e-12)
    # Merging into (or from) empty statistics is a copy.
    empty = sp.GaussianStats(10, 7).merge(one)
    torch.testing.assert_close(empty.covariance(), one.covariance())
    torch.testing.assert_close(one.merge(sp.GaussianStats(10, 7)).covariance(), empty.covariance())


def test_update_order_and_batch_size_do_not_matter():
    x = embeddings(30, 5, 8, seed=4)
    want = fit(x, batch=30).covariance()
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    for batch in (1, 4, 7):
        torch.testing.assert_close(fit(x[perm], batch=batch).covariance(), want, rtol=1e-10, atol=1e-12)


def test_model_size_is_at_most_055_of_a_full_inverse_covariance():
    stats = sp.GaussianStats(3, 100).update(torch.randn(120, 100, 3))
    g = stats.finalize()
    stored = sum(t.numel() * t.element_size() for t in g.state_dict().values())
    assert stored <= 0.55 * 3 * 100 * 100 * 4
    # The accumulator is packed too: half of a full [P, C, C] float64 scatter, plus the mean.
    assert stats.scatter.numel() + stats.mean.numel() <= 0.55 * 3 * 100 * 100


def test_state_dict_is_plain_tensors_that_round_trip_weights_only(tmp_path):
    g = fit(embeddings(12, 4, 6, seed=5), batch=5).finalize()
    assert all(isinstance(t, torch.Tensor) for t in g.state_dict().values())
    torch.save(g.state_dict(), tmp_path / "g.pt")
    back = sp.PatchGaussian.from_state_dict(torch.load(tmp_path / "g.pt", weights_only=True))
    assert (back.num_patches, back.dim) == (6, 4)
    torch.testing.assert_close(back.factor_packed, g.factor_packed, rtol=0, atol=0)
    torch.testing.assert_close(back.to("cpu").mean, g.mean, rtol=0, atol=0)


def test_bad_inputs_are_rejected_with_clear_messages():
    stats = sp.GaussianStats(6, 4)
    with pytest.raises(InputError, match="at least 2 samples, got 0"):
        stats.finalize()
    stats.update(torch.randn(1, 4, 2, 3))
    with pytest.raises(InputError, match="at least 2 samples, got 1"):
        stats.finalize()
    with pytest.raises(InputError, match="NaN or Inf"):
        stats.update(torch.tensor([float("nan")]).expand(2, 4, 2, 3))
    with pytest.raises(InputError, match="NaN or Inf"):
        stats.update(torch.full((2, 4, 2, 3), float("inf")))
    with pytest.raises(InputError, match="C=5 channels and P=6 patches, expected C=4"):
        stats.update(torch.randn(2, 5, 6))
    with pytest.raises(InputError, match="P=8 patches"):
        stats.update(torch.randn(2, 4, 8))
    with pytest.raises(InputError, match=r"spatial shape \(3, 2\) differs from the first update's \(2, 3\)"):
        stats.update(torch.randn(2, 4, 3, 2))
    with pytest.raises(InputError, match="floating-point"):
        stats.update(torch.ones(2, 4, 2, 3, dtype=torch.int32))
    with pytest.raises(InputError, match="cannot merge statistics of P=6, C=5"):
        stats.merge(sp.GaussianStats(6, 5))
    with pytest.raises(InputError, match="num_patches >= 1"):
        sp.GaussianStats(0, 4)
    stats.update(torch.randn(2, 4, 2, 3))
    with pytest.raises(InputError, match="eps must be a finite number >= 0"):
        stats.finalize(eps=-1.0)
    # 3 samples in 4 dimensions: singular without regularisation.
    with pytest.raises(InputError, match="not positive definite"):
        stats.finalize(eps=0.0)
    assert stats.count == 3  # the rejected updates left no trace
    with pytest.raises(InputError, match=r"factor_packed must have shape \[P, C\(C\+1\)/2\]"):
        sp.PatchGaussian(torch.zeros(6, 4), torch.zeros(6, 9))
    with pytest.raises(InputError, match="missing factor_packed"):
        sp.PatchGaussian.from_state_dict({"mean": torch.zeros(6, 4)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank, world, port, x, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Uneven shards; the last rank sees no data at all.
        shard = {0: x[:11], 1: x[11:]}.get(rank, x[:0])
        stats = sp.GaussianStats(x.shape[2], x.shape[1])
        if len(shard):
            stats.update(shard[:4]).update(shard[4:])
        stats.all_reduce()
        torch.save({"count": stats.count, "mean": stats.mean, "cov": stats.covariance()},
                   f"{out_path}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_three_gloo_processes_equals_one_pass(tmp_path):
    x = embeddings(25, 5, 6, seed=6)
    x[11:] += 3.0  # the shards have different means, so the merge must shift their scatters
    mp.spawn(_all_reduce_worker, args=(3, _free_port(), x, str(tmp_path / "rank")), nprocs=3, join=True)
    one = fit(x, batch=25)
    for rank in range(3):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["count"] == 25
        torch.testing.assert_close(got["mean"], one.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["cov"], one.covariance(), rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_cuda_fit_matches_cpu_fit():
    x = embeddings(40, 16, 9, seed=7).float()
    want = fit(x, batch=16).finalize()
    stats = sp.GaussianStats(9, 16, device="cuda")
    for start in range(0, 40, 16):
        stats.update(x[start:start + 16].cuda())
    got = stats.finalize()
    assert got.mean.is_cuda
    torch.testing.assert_close(got.mean.cpu(), want.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.factor_packed.cpu(), want.factor_packed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 8 * 9 * 9 * 5, 256 * 2**20])
def test_chunk_size_does_not_change_results(monkeypatch, budget):
    """Update, merge and finalize chunk the patches by a per-device memory budget (4 MiB on a
    CPU, 256 MiB on a GPU); the chunking must not change the float64 statistics."""
    from stnpadim_ext import stats as stats_mod

    x = embeddings(30, 9, 13, seed=11)
    want_stats = fit(x[:20], batch=7).merge(fit(x[20:], batch=10))
    want = want_stats.finalize()
    monkeypatch.setattr(stats_mod, "_chunk_bytes", lambda device: budget)
    got_stats = fit(x[:20], batch=7).merge(fit(x[20:], batch=10))
    got = got_stats.finalize()
    torch.testing.assert_close(got_stats.mean, want_stats.mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(got_stats.scatter, want_stats.scatter, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(got.factor_packed, want.factor_packed, rtol=1e-6, atol=1e-7)


def test_non_positive_definite_patch_is_named_after_all_chunks(monkeypatch):
    from stnpadim_ext import stats as stats_mod

    monkeypatch.setattr(stats_mod, "_chunk_bytes", lambda device: 1)  # one patch per chunk
    x = embeddings(20, 4, 5, seed=2)
    x[:, :, 3] = 5.0  # patch 3: constant -> zero covariance
    with pytest.raises(InputError, match="patch 3 is not positive definite"):
        fit(x, batch=20).finalize(eps=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_cuda_float64_statistics_match_cpu():
    x = embeddings(50, 24, 11, seed=5)
    want = fit(x, batch=16)
    stats = sp.GaussianStats(11, 24, device="cuda")
    for start in range(0, 50, 16):
        stats.update(x[start:start + 16].cuda())
    torch.testing.assert_close(stats.mean.cpu(), want.mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(stats.scatter.cpu(), want.scatter, rtol=1e-11, atol=1e-8)
    torch.testing.assert_close(stats.finalize().factor_packed.cpu(), want.finalize().factor_packed,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_cuda_non_finite_update_is_refused_at_finalize():
    x = embeddings(10, 4, 3, seed=1).cuda()
    x[2, 1, 0] = float("nan")
    stats = sp.GaussianStats(3, 4).update(x[:5]).update(x[5:])  # no device sync per update
    with pytest.raises(InputError, match="NaN or Inf"):
        stats.finalize()
