"""Thread limits for small-model work."""
import pytest
import torch

from stnpadim_ext._threads import SMALL_WORK_THREADS, limit_threads
from stnpadim_ext.models.stn import STN, train_stn


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_limit_threads_restores_the_count(two_threads):
    with limit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), limit_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with limit_threads(8):  # never raises the count
        assert torch.get_num_threads() == 2


def test_stn_training_runs_on_the_small_work_threads(two_threads):
    seen = []
    stn = STN(width=4)
    stn.features.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    train_stn(stn, torch.rand(6, 3, 32, 32), epochs=1, samples_per_epoch=8, retries=0,
              accept_weak=True, progress=False)
    assert seen and set(seen) == {SMALL_WORK_THREADS}
    assert torch.get_num_threads() == 2
