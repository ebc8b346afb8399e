"""The strict no-mmap safetensors reader and the one-line refusals of bad inputs."""

from __future__ import annotations

import os
import random
import struct

import pytest
import torch
from _helpers_io import NotATensor, write_raw_safetensors
from safetensors import safe_open
from safetensors.torch import save_file

from wadi_cli.errors import CheckpointError
from wadi_cli.io import SafetensorsFile, load_state_dict, open_checkpoint
from wadi_cli.io import safetensors_reader as reader


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g, dtype=torch.float64) * 10
    out = {
        f"t_{dt}".replace("torch.", ""): base.to(dt)
        for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    }
    out |= {f"i_{dt}".replace("torch.", ""): base.to(dt) for dt in (torch.int64, torch.int32, torch.int16)}
    out |= {
        "int8": base.clamp(-100, 100).to(torch.int8),
        "uint8": base.abs().clamp(0, 255).to(torch.uint8),
        "bool": base > 0,
        "f8_e4m3": base.clamp(-400, 400).to(torch.float8_e4m3fn),
        "f8_e5m2": base.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.25),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 7),
        "empty_mid": torch.empty(4, 0, 2, dtype=torch.float16),
        "conv": torch.randn(8, 4, 3, 3, generator=g),
    }
    return out


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_every_dtype_round_trips_bitwise(tmp_path):
    tensors = _all_dtypes()
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"note": "hello", "n": "3"})
    with open_checkpoint(path) as src:
        assert sorted(src.keys()) == sorted(tensors)
        assert src.metadata() == {"note": "hello", "n": "3"}
        for name, ref in tensors.items():
            assert src.shape(name) == tuple(ref.shape)
            assert src.dtype(name) == ref.dtype
            got = src.get(name)
            assert _bitwise_equal(got, ref), name
        assert src.numel() == sum(t.numel() for t in tensors.values())
        assert src.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())


def test_agrees_with_safetensors_own_reader(tmp_path):
    tensors = _all_dtypes()
    path = tmp_path / "all.safetensors"
    save_file(tensors, path)
    with SafetensorsFile(path) as mine, safe_open(str(path), framework="pt") as ref:
        names = ref.keys()
        assert sorted(mine.keys()) == sorted(names)
        for name in names:
            assert _bitwise_equal(mine.get(name), ref.get_tensor(name)), name


def test_reads_are_fresh_and_writable(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(4)}, path)
    with open_checkpoint(path) as src:
        a = src.get("w")
        a += 1  # would fail or leak into the next read if backed by a read-only/shared map
        assert torch.equal(src.get("w"), torch.ones(4))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_read_into_reused_buffer(tmp_path, suffix):
    tensors = {"w": torch.randn(6, 5), "b": torch.randn(5), "s": torch.tensor(2.0), "e": torch.empty(0, 3)}
    path = tmp_path / f"r{suffix}"
    save_file(tensors, path) if suffix == ".safetensors" else torch.save(tensors, path)
    scratch = torch.full((64,), float("nan"))
    with open_checkpoint(path) as src:
        for name, ref in tensors.items():
            got = src.get(name, out=scratch[: ref.numel()])
            assert torch.equal(got, ref) and got.shape == ref.shape
            if ref.numel():
                assert got.data_ptr() == scratch.data_ptr()
        with pytest.raises(ValueError, match="contiguous"):
            src.get("w", out=torch.empty(30, dtype=torch.float64))
        with pytest.raises(ValueError, match="contiguous"):
            src.get("w", out=torch.empty(6, 10)[:, ::2])


def test_short_reads_are_completed(tmp_path, monkeypatch):
    tensors = {"x": torch.randn(37, 11, dtype=torch.float64), "y": torch.arange(1000, dtype=torch.int16)}
    path = tmp_path / "s.safetensors"
    save_file(tensors, path)
    real = os.preadv

    def stingy(fd, buffers, offset):  # at most 5 bytes per call
        return real(fd, [buffers[0][:5]], offset)

    monkeypatch.setattr(reader.os, "preadv", stingy)
    with SafetensorsFile(path) as f:
        for name, ref in tensors.items():
            assert torch.equal(f.get(name), ref)


def test_random_corruptions_never_escape_as_other_errors(tmp_path):
    """Differential fuzz: flip header bytes; we must raise CheckpointError or agree with safetensors."""
    path = tmp_path / "f.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2, dtype=torch.float16)}, path)
    good = path.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    rng = random.Random(0)
    accepted = 0
    for i in range(150):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(0, 8 + n)
            data[pos] = rng.randrange(256)
        bad = tmp_path / f"bad{i}.safetensors"
        bad.write_bytes(bytes(data))
        try:
            with SafetensorsFile(bad) as f:
                ours = {k: f.get(k) for k in f.tensors}
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(bad) in str(exc)
            continue
        accepted += 1
        with safe_open(str(bad), framework="pt") as ref:  # must be a file safetensors accepts too
            names = ref.keys()
            assert sorted(names) == sorted(ours)
            for k in names:
                assert _bitwise_equal(ours[k], ref.get_tensor(k))
    assert accepted < 150


# ---- refusals: each is one CheckpointError line naming the file -------------------------------


def _refused(path, *needles, **kw):
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_missing_path(tmp_path):
    _refused(tmp_path / "nope.safetensors", "no such file")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _refused(tmp_path, "no model weights found")


def test_empty_file(tmp_path):
    p = tmp_path / "e.safetensors"
    p.write_bytes(b"")
    _refused(p, "empty file")


def test_truncated_file(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(100)}, p)
    p.write_bytes(p.read_bytes()[:-10])
    _refused(p, "truncated")


def test_truncated_inside_header(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(100)}, p)
    p.write_bytes(p.read_bytes()[:20])
    _refused(p, "header length")


def test_header_lies_about_size(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}
    _refused(write_raw_safetensors(tmp_path / "l.safetensors", h, bytes(8)), "header lies", "'a'")


def test_overlapping_offsets(tmp_path):
    h = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _refused(write_raw_safetensors(tmp_path / "o.safetensors", h, bytes(12)), "overlaps")


def test_gap_between_tensors(tmp_path):
    h = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    _refused(write_raw_safetensors(tmp_path / "g.safetensors", h, bytes(12)), "gap")


def test_offsets_past_end_of_file(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    _refused(write_raw_safetensors(tmp_path / "p.safetensors", h, bytes(8)), "truncated")


def test_trailing_bytes(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    _refused(write_raw_safetensors(tmp_path / "x.safetensors", h, bytes(9)), "trailing")


def test_unknown_dtype_bad_shape_bad_metadata_bad_json(tmp_path):
    h = {"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}
    _refused(write_raw_safetensors(tmp_path / "d.safetensors", h, bytes(4)), "unsupported dtype")
    h = {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}
    _refused(write_raw_safetensors(tmp_path / "s.safetensors", h, bytes(4)), "invalid shape")
    h = {"__metadata__": {"k": 3}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    _refused(write_raw_safetensors(tmp_path / "m.safetensors", h, bytes(4)), "__metadata__")
    p = tmp_path / "j.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{oops")
    _refused(p, "invalid JSON")


def test_text_file(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("these are not weights, just some notes about weights\n" * 3)
    _refused(p, "not a safetensors file")
    q = tmp_path / "notes.txt"
    q.write_text("hello")
    _refused(q, "unknown checkpoint format")


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_renamed_to_safetensors(tmp_path, zipfile):
    p = tmp_path / "renamed.safetensors"
    torch.save({"a": torch.ones(2)}, p, _use_new_zipfile_serialization=zipfile)
    _refused(p, "PyTorch pickle")


@pytest.mark.parametrize("zipfile", [True, False])
def test_safe_pickle_formats_load(tmp_path, zipfile):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    p = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, p, _use_new_zipfile_serialization=zipfile)
    with open_checkpoint(p) as src:
        assert "weights_only" in src.description
        assert sorted(src.keys()) == ["a", "b"]
        got = src.get("a")
        assert torch.equal(got, sd["a"])
    flat = tmp_path / "model.bin"
    torch.save(sd, flat)
    assert all(torch.equal(load_state_dict(flat)[k], v) for k, v in sd.items())


@pytest.mark.parametrize("torch_says", [None, "Unsupported operand 149", "Re-running `torch.load` with x"])
def test_pickle_needing_unpickling_is_refused(tmp_path, monkeypatch, torch_says):
    """The refusal is wadi's own sentence (the file holds pickled code, wadi will not run
    it, how to convert a trusted file), whatever torch's loader says (``torch_says``: its
    message replaced by another, as between torch versions)."""
    import pickle

    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "callback": NotATensor()}, p)
    if torch_says:

        def load(*args, **kwargs):
            raise pickle.UnpicklingError(torch_says)

        monkeypatch.setattr(torch, "load", load)
    msg = _refused(p, "holds pickled Python code", "NotATensor", "wadi will not run it", "safetensors")
    assert "weights_only=False" in msg  # the conversion one-liner
    assert "Re-running" not in msg and "WeightsUnpickler" not in msg and "Unsupported" not in msg


def test_corrupt_pickle_and_empty_pickle(tmp_path):
    rng = random.Random(1)
    p = tmp_path / "junk.pt"
    for _ in range(200):  # torch's loader fails in many ways on junk; each must be one refusal line
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.choice([3, 50, 200]))))
        _refused(p, "PyTorch")
    p.write_bytes(b"\x80\x02}q\x00X\x01")  # a pickle cut short
    _refused(p, "not a readable PyTorch checkpoint")
    e = tmp_path / "empty.pth"
    e.write_bytes(b"")
    _refused(e, "empty file")
    t = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), t)
    _refused(t, "not a dict of tensors")
