"""Shared CLI helpers: CPU thread choice per backbone."""

import pytest
import torch

from wadi_cli.cli.common import use_backbone_cpu_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("backbone", "device", "omp", "expected"),
    [
        ("tiny", "cpu", None, 1),  # tiny prefers one thread on CPU
        ("tiny", "cpu", "2", 2),  # the user's OMP_NUM_THREADS wins
        ("sd15", "cpu", None, 2),  # big backbones keep torch's choice
        ("nonsense", "cpu", None, 2),  # unknown names are reported elsewhere, not here
    ],
)
def test_backbone_cpu_threads(monkeypatch, restore_threads, backbone, device, omp, expected):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    torch.set_num_threads(2)
    use_backbone_cpu_threads(backbone, device)
    assert torch.get_num_threads() == expected
