"""Atomic writes, provenance metadata, output-folder ownership, early writability checks."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import SafetensorError, safe_open

from wadi_cli import __version__
from wadi_cli.errors import BadInputError, WriteError
from wadi_cli.io import (
    MARKER,
    atomic_output_dir,
    check_writable,
    load_state_dict,
    provenance_metadata,
    safetensors_writer,
    save_safetensors,
    write_text_atomic,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_save_round_trip_with_provenance(tmp_path):
    base = torch.randn(6, 4)
    sd = {"a": base, "a_view": base[:3], "b": torch.arange(5, dtype=torch.int64), "s": torch.tensor(1.0)}
    meta = provenance_metadata({"rank": 256, "alpha_T": 0.0047}, ["teacher.safetensors", "student/"])
    out = save_safetensors(sd, tmp_path / "sub" / "w.safetensors", meta)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    with safe_open(str(out), framework="pt") as f:
        stored = f.metadata()
    assert stored["wadi_version"] == __version__
    assert json.loads(stored["wadi_config"]) == {"alpha_T": 0.0047, "rank": 256}
    assert json.loads(stored["wadi_sources"]) == ["teacher.safetensors", "student/"]
    assert _leftovers(tmp_path / "sub") == []


@pytest.mark.parametrize(
    "error",
    [  # what safetensors raises on a full disk (checked on a 1 MB tmpfs), and a plain OSError
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_save_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch, error):
    dest = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.ones(2)}, dest)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise error

    monkeypatch.setattr(safetensors_writer, "save_file", crash)
    with pytest.raises(WriteError, match="cannot write .*w.safetensors: No space left on device$"):
        save_safetensors({"a": torch.zeros(2)}, dest)
    assert torch.equal(load_state_dict(dest)["a"], torch.ones(2))
    assert _leftovers(tmp_path) == []


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="str -> str"):
        save_safetensors({"a": torch.ones(1)}, tmp_path / "x.safetensors", {"k": 3})
    with pytest.raises(BadInputError, match="expected str -> torch.Tensor"):
        save_safetensors({"a": [1, 2]}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_success_and_failure(tmp_path):
    dest = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(dest) as d:
        (d / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert not dest.exists() and _leftovers(tmp_path) == []
    with atomic_output_dir(dest) as d:
        (d / "result.txt").write_text("ok")
        assert not dest.exists()  # nothing appears before the block succeeds
    assert (dest / "result.txt").read_text() == "ok"
    assert (dest / MARKER).is_file()
    assert _leftovers(tmp_path) == []


def test_atomic_dir_replaces_only_our_folders(tmp_path):
    ours = tmp_path / "ours"
    with atomic_output_dir(ours) as d:
        (d / "old.txt").write_text("old")
    with atomic_output_dir(ours) as d:
        (d / "new.txt").write_text("new")
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "new.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as d:
        (d / "a").write_text("a")
    assert (empty / "a").exists()
    assert _leftovers(tmp_path) == []


def test_atomic_dir_refuses_user_folder_before_running(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    ran = False
    with pytest.raises(BadInputError, match="not written by wadi"), atomic_output_dir(user):
        ran = True
    assert not ran and (user / "holiday.jpg").read_bytes() == b"precious"
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(BadInputError, match="not a folder"), atomic_output_dir(afile):
        pass
    assert _leftovers(tmp_path) == []


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "w.safetensors") == tmp_path / "a" / "b" / "w.safetensors"
    assert not (tmp_path / "a").exists()  # the probe leaves nothing behind
    check_writable(tmp_path / "new_run", directory=True)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        check_writable(blocker / "out" / "w.safetensors")
    with pytest.raises(BadInputError, match="is a folder"):
        check_writable(tmp_path)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "doc.txt").write_text("x")
    with pytest.raises(BadInputError, match="not written by wadi"):
        check_writable(tmp_path / "user", directory=True)
    assert sorted(os.listdir(tmp_path)) == ["blocker", "user"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_check_writable_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(WriteError, match="not writable"):
            check_writable(ro / "w.safetensors")
    finally:
        ro.chmod(0o700)


def test_check_writable_folder_on_a_read_only_file_system(tmp_path, monkeypatch):
    """The same refusal as above where permission bits cannot say no (root, as in CI and
    the Docker image): every file or folder creation and every rename under ``ro`` fails
    with EROFS, as on a read-only mount, and so does saving there (one-line WriteError);
    nothing is left behind."""
    import errno

    from wadi_cli.errors import WriteError

    ro = tmp_path / "ro"
    ro.mkdir()
    real_open, real_mkdir, real_replace = os.open, os.mkdir, os.replace

    def under_ro(path) -> bool:
        return os.path.abspath(path).startswith(str(ro) + os.sep)

    def erofs(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def refusing_open(path, flags, *args, **kwargs):
        if under_ro(path) and flags & (os.O_CREAT | os.O_WRONLY):
            raise erofs(path)
        return real_open(path, flags, *args, **kwargs)

    def refusing_mkdir(path, *args, **kwargs):
        if under_ro(path):
            raise erofs(path)
        return real_mkdir(path, *args, **kwargs)

    def refusing_replace(src, dst, *args, **kwargs):
        if under_ro(dst):
            raise erofs(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "mkdir", refusing_mkdir)
    monkeypatch.setattr(os, "replace", refusing_replace)
    with pytest.raises(WriteError, match="not writable .*Read-only file system") as info:
        check_writable(ro / "w.safetensors")
    assert "\n" not in str(info.value)
    with pytest.raises(WriteError, match="Read-only file system") as info:
        save_safetensors({"w": torch.zeros(2)}, ro / "w.safetensors")
    assert "\n" not in str(info.value)
    assert list(ro.iterdir()) == []


def test_outputs_get_umask_permissions_not_private_temp_modes(tmp_path):
    """mkstemp/mkdtemp create 0600/0700; finished outputs must follow the umask instead."""
    import os

    import torch

    from wadi_cli.io import atomic_output_dir, save_safetensors

    old = os.umask(0o022)
    try:
        f = save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        with atomic_output_dir(tmp_path / "out") as d:
            (d / "x.txt").write_text("x")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    from pathlib import Path

    target = write_text_atomic(tmp_path / "table.json", "first\n")
    write_text_atomic(target, "second\n")
    assert target.read_text() == "second\n" and _leftovers(tmp_path) == []

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "third\n")
    monkeypatch.undo()
    assert target.read_text() == "second\n" and _leftovers(tmp_path) == []


def test_safetensors_metadata_is_written_sorted_so_reruns_are_byte_identical(tmp_path):
    """safetensors orders ``__metadata__`` by a per-process hash map; wadi rewrites the
    header sorted, so the same tensors and metadata give the same bytes whatever the order
    the keys were given in (the two-process check is ``test_reproducible_outputs.py``)."""
    import struct

    from safetensors.torch import load_file

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    keys = [f"k{i:02d}" for i in range(40)]
    meta = {k: f"value é {k}" for k in keys}
    a = save_safetensors(tensors, tmp_path / "a.safetensors", meta)
    b = save_safetensors(tensors, tmp_path / "b.safetensors", dict(reversed(list(meta.items()))))
    assert a.read_bytes() == b.read_bytes()
    raw = a.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert list(json.loads(raw[8 : 8 + n])["__metadata__"]) == keys
    assert (8 + n) % 8 == 0
    got = load_file(a)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    with safe_open(str(a), framework="pt") as f:
        assert f.metadata() == meta


def test_any_writer_clears_every_stale_temporary_in_its_folder_and_says_so(tmp_path):
    """A killed writer's temporary of ``a.safetensors`` is removed by a write of
    ``b.txt`` in the same folder (one note naming it); a live writer's temporary, and a
    young one from another host, stay; another host's day-old one goes."""
    import subprocess
    import sys
    import time
    import warnings

    from wadi_cli.errors import WadiNote
    from wadi_cli.io.stale_temps import FOREIGN_STALE_AGE_S, host_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = host_name()
    gone = tmp_path / f".a.safetensors.wadi-{host}-{dead.pid}.k3j4h5g6.tmp"
    gone.mkdir()
    (gone / "a.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".c.safetensors.wadi-{host}-{os.getpid()}.aaaaaaaa.tmp"
    live.mkdir()
    young = tmp_path / ".d.txt.wadi-otherhost-1.bbbbbbbb.tmp"
    old = tmp_path / ".e.txt.wadi-otherhost-1.cccccccc.tmp"
    young.write_text("y")
    old.write_text("o")
    past = time.time() - FOREIGN_STALE_AGE_S - 60
    os.utime(old, (past, past))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_text_atomic(tmp_path / "b.txt", "hello")
        write_text_atomic(tmp_path / "b2.txt", "again")  # nothing left to say
    notes = [str(w.message) for w in caught if issubclass(w.category, WadiNote)]
    assert len(notes) == 1 and gone.name in notes[0] and old.name in notes[0], notes
    assert "2 temporaries" in notes[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b.txt", "b2.txt", live.name, young.name])
