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


def test_third_party_chatter_is_filtered_and_everything_else_kept(monkeypatch):
    import logging

    from wadi_cli.quiet import quiet_third_party_logs

    monkeypatch.delenv("WADI_DEBUG", raising=False)
    quiet_third_party_logs()
    quiet_third_party_logs()  # idempotent
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    loggers = [
        logging.getLogger(n) for n in ("transformers.utils.import_utils", "bitsandbytes.backends.cpu.ops")
    ]
    assert sum(type(f).__name__ == "_DropMessages" for f in loggers[0].filters) == 1
    handler = Collect(level=logging.WARNING)
    for log in loggers:  # a handler on the logger itself: transformers may not propagate to root
        log.addHandler(handler)
    try:
        loggers[0].warning("`CLIPImageProcessor` requires torchvision (not installed); falling back")
        loggers[0].warning("Some weights of the model checkpoint were not used")
        loggers[1].warning("Failed to load CPU gemm_4bit_forward: x")
    finally:
        for log in loggers:
            log.removeHandler(handler)
    assert seen == ["Some weights of the model checkpoint were not used"]


def test_machine_info_against_independent_sources():
    """Versions from the installed distribution's metadata and ``sys.version_info``; the
    CPU name from ``/proc/cpuinfo`` parsed here with a regular expression (Linux)."""
    import importlib.metadata
    import re
    import sys
    from pathlib import Path

    from wadi_cli.machine import machine_info

    info = machine_info()
    assert info["torch"] == importlib.metadata.version("torch")
    assert info["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert isinstance(info["cores"], int) and info["cores"] >= 1
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.*?)\s*$", cpuinfo.read_text(), re.M) if cpuinfo.is_file() else []
    if names:
        assert info["cpu"] == names[0]


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (
            "processor\t: 0\nvendor_id\t: X\nmodel name\t: Planted CPU @ 2.0GHz  \nprocessor\t: 1\n",
            "Planted CPU @ 2.0GHz",
        ),
        ("processor\t: 0\nvendor_id\t: X\n", "planted-processor"),  # no model name: platform's answer
        (None, "planted-processor"),  # unreadable
    ],
)
def test_cpu_model_reads_the_first_model_name(monkeypatch, cpuinfo, expected):
    import platform
    from pathlib import Path

    from wadi_cli.machine import cpu_model

    def read_text(self, *args, **kwargs):
        if cpuinfo is None:
            raise OSError("unreadable")
        return cpuinfo

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(platform, "processor", lambda: "planted-processor")
    assert cpu_model() == expected
