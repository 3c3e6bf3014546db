"""Distributed fit: CPU processes on gloo over loopback fit the same model as one process."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stnpadim_ext.models.padim import PaDiM, load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        train = torch.load(data_path, weights_only=True)["train"]
        # Uneven shards, and a process with nothing to fit (it must not hang the others).
        shard = (train[:7], train[7:], train[:0])[rank]
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(shard), batch_size=3)
        model = PaDiM(image_size=64, progress=False).fit(loader)
        model.save(f"{out_dir}/rank{rank}.padim")
    finally:
        dist.destroy_process_group()


def test_three_process_gloo_fit_equals_single_process_fit(tmp_path):
    train, test = torch.rand(12, 3, 64, 64), torch.rand(3, 3, 64, 64)
    torch.save({"train": train}, tmp_path / "data.pt")
    mp.spawn(_worker, args=(3, _free_port(), str(tmp_path / "data.pt"), str(tmp_path)), nprocs=3,
             join=True)
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
