"""A checkpoint written before the optimizer took a step resumes.

With an fp16 base the GradScaler skips the first steps (inf gradients while it finds its
scale), so AdamW has no state yet: its file holds metadata (the param groups) and no
tensors. Reading such a file used to lose the metadata (``not an optimizer state written
by wadi``), so the run could not resume."""

from __future__ import annotations

import torch

from wadi_cli.distill.checkpoint import _optimizer_from_file, _optimizer_to_file
from wadi_cli.io import open_checkpoint, save_safetensors


def test_a_file_without_tensors_keeps_its_metadata(tmp_path):
    path = save_safetensors({}, tmp_path / "meta-only.safetensors", {"kind": "x", "n": "3"})
    src = open_checkpoint(path)
    try:
        assert list(src.keys()) == []
        assert src.metadata() == {"kind": "x", "n": "3"}
    finally:
        src.close()
    # and the file handle was closed (the store is owned even without entries)
    assert all(store._file._fd is None for store in src._stores())


def test_optimizer_state_round_trip_before_the_first_step(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.99))
    state = opt.state_dict()
    assert state["state"] == {}  # no step taken yet
    _optimizer_to_file(state, tmp_path / "optim.safetensors")
    back = _optimizer_from_file(tmp_path / "optim.safetensors")
    assert back["state"] == {}
    assert back["param_groups"] == state["param_groups"]
    fresh = torch.optim.AdamW(params, lr=1.0)
    fresh.load_state_dict(back)
    assert fresh.param_groups[0]["lr"] == 0.01 and fresh.param_groups[0]["betas"] == (0.8, 0.99)
