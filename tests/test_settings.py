"""The resolve cell on a machine it is not running on: GPU counts are faked, nothing touches CUDA."""
import pytest

from vl2lab.workbook import settings


@pytest.fixture
def gpus(monkeypatch):
    def have(n):
        monkeypatch.setattr(settings, "gpu_count", lambda: n)
    return have


def test_one_gpu_and_two_ranks_run_on_cpu_processes_and_say_so(gpus, capsys):
    gpus(1)
    s = settings.resolve({"WORLD_SIZE": 2}, quiet=True)
    assert (s.BACKEND, s.DEVICE) == ("gloo", "cpu") and settings.hardware(s).startswith("CPU")
    one = settings.resolve({"WORLD_SIZE": 1}, quiet=True)
    assert (one.BACKEND, one.DEVICE) == ("nccl", "cuda")
    assert one.world_sizes({1, 2, 1}) == [1]
    assert "world size 2: 2 ranks on NCCL need 2 GPUs, this machine has 1" in capsys.readouterr().out
    assert s.world_sizes([2, 1]) == [1, 2] and s.cannot_run(8) is None       # gloo runs any size


def test_nccl_asked_for_more_ranks_than_gpus_is_one_clear_error(gpus):
    gpus(1)
    with pytest.raises(settings.SettingsError, match="needs 4 GPUs, this machine has 1"):
        settings.resolve({"WORLD_SIZE": 4, "BACKEND": "nccl"}, quiet=True)
    gpus(0)
    with pytest.raises(settings.SettingsError, match="no NVIDIA GPU is visible"):
        settings.resolve({"DEVICE": "cuda"}, quiet=True)
