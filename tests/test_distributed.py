"""Distributed fit and calibration: shares, and CPU processes on gloo over loopback that fit
the same model as one process.

Model-level here (torch.multiprocessing, a process group per test); the command line under
torchrun is in test_torchrun.py.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stnpadim_ext.cli.experiment as experiment
from stnpadim_ext.cli import main
from stnpadim_ext.cli.experiment import ModelOptions, fit_model
from stnpadim_ext.data.mvtec import load_category
from stnpadim_ext.distributed import Shard, reassemble, share_indices, share_of
from stnpadim_ext.distributed.session import cpu_share, pick_device
from stnpadim_ext.distributed.shards import reassemble_tensors
from stnpadim_ext.errors import InputError
from stnpadim_ext.models.padim import PaDiM, load
from stnpadim_ext.models.stn.poses import posed_batches

SIZE = 64
RANGES = {"rotation": 20.0, "translation": 0.1, "scale": 1.1}
# The Gaussians of N processes against one process's, float32: the features are
# bit-identical (each batch as one process sees it), the float64 statistics differ in their
# summation order only (~1e-16 relative), which float32 rounding hides but for an ulp here
# and there; the Cholesky inverse can stretch that by the covariances' condition number.
MEAN_TOL = {"rtol": 1e-6, "atol": 1e-7}
FACTOR_TOL = {"rtol": 1e-5, "atol": 1e-6}
SCORE_TOL = {"rtol": 1e-5, "atol": 1e-6}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------
# Shares (pure)


@pytest.mark.parametrize("n, batch, world", [(10, 3, 2), (10, 3, 3), (2, 4, 3), (0, 2, 2), (9, 3, 3), (7, 1, 4)])
def test_shares_cover_every_item_once_in_whole_batches(n, batch, world):
    shares = [share_indices(n, batch, Shard(r, world)) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    batches = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    for rank, share in enumerate(shares):
        # Split again into batches, a share gives back exactly the batches it owns.
        assert [share[i:i + batch] for i in range(0, len(share), batch)] == batches[rank::world]
    items = [f"x{i}" for i in range(n)]
    assert reassemble([share_of(items, batch, Shard(r, world)) for r in range(world)], batch) == items
    tensor = torch.arange(n * 2.0).reshape(n, 2)
    parts = [share_of(tensor, batch, Shard(r, world)) for r in range(world)]
    assert torch.equal(reassemble_tensors(parts, batch), tensor)


def test_posed_batches_shards_are_the_single_process_batches_with_their_views():
    images = torch.rand(11, 3, 32, 32)
    whole = list(posed_batches(images, RANGES, seed=3, batch_size=2, n_views=15))
    for world in (2, 3):
        ranks = [list(posed_batches(images, RANGES, seed=3, batch_size=2, n_views=15, shard=Shard(r, world)))
                 for r in range(world)]
        assert sum(map(len, ranks)) == len(whole)
        for number, (x, views, _) in enumerate(whole):  # global batch b: rank b % world's (b // world)-th
            got_x, got_views, _ = ranks[number % world][number // world]
            assert torch.equal(got_x, x) and torch.equal(got_views, views)


def test_cpu_ranks_split_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [cpu_share(n) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    assert pick_device("cpu", 3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None, 1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device(None, 1) == torch.device("cuda", 1)
    assert pick_device("cuda", 0) == torch.device("cuda", 0)
    assert pick_device("cuda:1", 0) == torch.device("cuda", 1)  # asked for: kept
    with pytest.raises(InputError, match="LOCAL_RANK 2: this host has 2 CUDA device"):
        pick_device(None, 2)


# ----------------------------------------------------------------------------------------
# Processes


def _spawn(world: int, worker, *args) -> None:
    port = _free_port()
    mp.spawn(_init_and_run, args=(world, port, worker, args), nprocs=world, join=True)


def _init_and_run(rank: int, world: int, port: int, worker, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _shard_worker(rank: int, world: int, data_path: str, out_dir: str) -> None:
    train = torch.load(data_path, weights_only=True)["train"]
    # Uneven shards, and a process with nothing to fit (it must not hang the others).
    shard = (train[:7], train[7:], train[:0])[rank]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(shard), batch_size=3)
    model = PaDiM(image_size=64, progress=False).fit(loader)
    model.save(f"{out_dir}/rank{rank}.padim")


def test_three_process_gloo_fit_equals_single_process_fit(tmp_path):
    train, test = torch.rand(12, 3, 64, 64), torch.rand(3, 3, 64, 64)
    torch.save({"train": train}, tmp_path / "data.pt")
    _spawn(3, _shard_worker, str(tmp_path / "data.pt"), str(tmp_path))
    single = PaDiM(image_size=64, progress=False).fit(train)
    want_scores, want_maps = single.predict(test)
    for rank in range(3):
        model = load(tmp_path / f"rank{rank}.padim", progress=False)
        torch.testing.assert_close(model.gaussian.mean, single.gaussian.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.gaussian.factor_packed, single.gaussian.factor_packed,
                                   rtol=1e-4, atol=1e-4)
        scores, maps = model.predict(test)
        torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(maps, want_maps, rtol=1e-4, atol=1e-3)
    # Neither shard alone gives that model: the statistics really were summed.
    alone = PaDiM(image_size=64, progress=False).fit(train[:7])
    assert not torch.allclose(alone.gaussian.mean, single.gaussian.mean, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--categories", "part_drift", "--image-size", str(SIZE),
                 "--n-train", "14", "--n-test-good", "1", "--n-test-defect", "0"]) == 0
    return root


# A short STN training and few posed views: the distributed wiring is under test, not the STN.
QUICK_STN = ModelOptions(stn="reconstruct", stn_epochs=1, image_size=SIZE, batch_size=3, pose_views=20,
                         accept_weak_stn=True, false_reject_rate=0.2,
                         stn_train={"samples_per_epoch": 8, "batch_size": 4, "image_size": SIZE, "retries": 0})
PLAIN = ModelOptions(stn="none", image_size=SIZE, batch_size=3, false_reject_rate=0.2)


def _fit_worker(rank: int, world: int, root: str, options: ModelOptions, out: str) -> None:
    if rank != 0:  # another host's rounding: its own STN comes out different
        train_stn = experiment.train_stn

        def differently(stn, *args, **kwargs):
            history = train_stn(stn, *args, **kwargs)
            with torch.no_grad():
                for parameter in stn.parameters():
                    parameter.add_(1e-3)
            return history

        experiment.train_stn = differently
    category = load_category(root, "part_drift")
    model, _ = fit_model(category.train_paths, options, progress=False)
    model.save(f"{out}/rank{rank}.padim")


def _assert_same_model(got: PaDiM, want: PaDiM) -> None:
    torch.testing.assert_close(got.gaussian.mean, want.gaussian.mean, **MEAN_TOL)
    torch.testing.assert_close(got.gaussian.factor_packed, want.gaussian.factor_packed, **FACTOR_TOL)
    assert torch.equal(got.embedding.idx, want.embedding.idx)
    got_cal, want_cal = got.calibration.to_config(), want.calibration.to_config()
    assert got_cal["n"] == want_cal["n"] and got_cal["pose_ranges"] == want_cal["pose_ranges"]
    assert got_cal["threshold"] == pytest.approx(want_cal["threshold"], **{"rel": SCORE_TOL["rtol"]})


@pytest.mark.parametrize("world, options", [(2, QUICK_STN), (3, PLAIN)], ids=["2-stn", "3-plain"])
def test_fit_model_on_n_processes_equals_one_process(synth, tmp_path, world, options):
    """fit_model under a process group: the hold-out split, the STN (rank 0's, even where
    another rank's training came out different), the posed views and the calibration
    scores are global, so every rank ends with one process's model."""
    _spawn(world, _fit_worker, str(synth), options, str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        want, _ = fit_model(load_category(synth, "part_drift").train_paths, options, progress=False)
    finally:
        torch.set_num_threads(threads)
    models = [load(tmp_path / f"rank{r}.padim", progress=False) for r in range(world)]
    for model in models:
        _assert_same_model(model, want)
        if options.stn != "none":
            for name, value in want.stn.state_dict().items():
                assert torch.equal(model.stn.state_dict()[name], value), name
    # Every rank holds the very same model (the all-reduced statistics), bit for bit.
    for model in models[1:]:
        assert torch.equal(model.gaussian.factor_packed, models[0].gaussian.factor_packed)
        assert model.threshold == models[0].threshold
