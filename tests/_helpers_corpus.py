"""The bad-input corpus: hostile and broken files for every wadi command that reads files,
and the rule each command must follow with them.

Every case runs one command in-process (Typer's ``CliRunner``) with one bad input in one
slot (``sample --weights``, ``merge BASE``, ``distill --config`` ...). The rule: a non-zero
exit, exactly one line on stderr (``error: ...``) and no traceback, nothing at ``--out``
(nor a temporary sibling of it), an input run folder left as it was, and no code from the
file executed: the malicious pickles and the YAML payload would create
``Corpus.marker`` if they ever ran. The only accepted inputs are NaN/Inf weights for
``wadi swap``, which by design (like ``wadi analyze``) leaves such rows as the student's and
counts them.

Used by ``tests/system/test_bad_input_corpus.py`` (one parametrised test per case) and by
``analysis/bad_input/table.py`` (the committed table).
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import io
import json
import os
import pickle
import random
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT_SIMULATES_UNREADABLE = os.geteuid() == 0  # root reads any file: refuse its reads instead


class Payload:
    """Unpickling this creates ``path`` (``builtins.open(path, "w")``): proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


# ---- the slots: where a bad input goes, per command ------------------------------------------
PROMPT = "a red circle at the top left"
TINY = ["-b", "tiny", "--model", "{pipe}", "--device", "cpu"]
OUT = ["--out", "{out}"]
ONE_STEP = ["--device", "cpu", "--max-steps", "1", "--regression-weight", "0", *OUT]
SLOTS: dict[tuple[str, str], tuple[str, list[str]]] = {
    # (command, slot) -> (input family, argument template)
    ("sample", "--weights"): ("weights", ["sample", PROMPT, *TINY, "--weights", "{bad}", *OUT]),
    ("eval", "--weights"): ("weights", ["eval", *TINY, "--weights", "{bad}", "-n", "4", *OUT]),
    ("eval", "--classifier"): ("weights", ["eval", *TINY, "--teacher", "--steps", "2", "-n", "4",
                                           "--classifier", "{bad}", *OUT]),
    ("swap", "TEACHER"): ("weights", ["swap", "{bad}", "{merged}", "--keep", "direction", *OUT]),
    ("swap", "STUDENT"): ("weights", ["swap", "{base}", "{bad}", "--keep", "direction", *OUT]),
    ("merge", "BASE"): ("weights", ["merge", "{bad}", "{adapter}", *OUT]),
    ("merge", "ADAPTER"): ("weights", ["merge", "{base}", "{bad}", *OUT]),
    ("export", "RUN"): ("run", ["export", "{bad}", "-f", "merged", *OUT]),
    ("export", "--checkpoint"): ("run", ["export", "{run}", "--checkpoint", "{bad}", "-f", "adapter", *OUT]),
    ("distill", "--resume"): ("run", ["distill", "--out", "{bad}", "--resume", "latest", "--max-steps", "3",
                                      "--device", "cpu"]),
    ("sample", "--weights RUN"): ("run", ["sample", PROMPT, *TINY, "--weights", "{bad}", *OUT]),
    ("swap", "STUDENT RUN"): ("run", ["swap", "{pipe}", "{bad}", "--keep", "direction", *OUT]),
    ("sample", "--prompts"): ("prompts", ["sample", *TINY, "--prompts", "{bad}", *OUT]),
    ("distill", "--prompts"): ("prompts", ["distill", "--model", "{pipe}", "--prompts", "{bad}", *ONE_STEP]),
    ("distill", "--config"): ("config", ["distill", "--model", "{pipe}", "--config", "{bad}", *ONE_STEP]),
    ("sample", "--model"): ("model", ["sample", PROMPT, "-b", "tiny", "--model", "{bad}", "--teacher",
                                      "--steps", "2", "--device", "cpu", *OUT]),
    ("eval", "--model"): ("model", ["eval", "-b", "tiny", "--model", "{bad}", "-n", "4", "--device", "cpu",
                                    *OUT]),
    ("distill", "--model"): ("model", ["distill", "--model", "{bad}", *ONE_STEP]),
    ("info", "--backbone"): ("flags", ["info", "--backbone", "{bad}"]),
    ("analyze", "TEACHER"): ("analyze-weights", ["analyze", "{bad}", "{merged}"]),
    ("analyze", "STUDENT"): ("analyze-weights", ["analyze", "{base}", "{bad}"]),
    ("analyze", "STUDENT quantised"): ("quantised", ["analyze", "{base}", "{bad}"]),
    ("merge", "ADAPTER mis-scaled"): ("mis-scaled", ["merge", "{base}", "{bad}", *OUT]),
}  # fmt: skip


#: input family -> kinds (file names in the corpus)
KINDS: dict[str, list[str]] = {
    "weights": [
        "empty file", "truncated safetensors", "header lies about offsets", "header lies about dtype",
        "huge header length", "random bytes", "pickle renamed .safetensors", "malicious .ckpt",
        "malicious .bin", "adapter shapes do not fit", "adapter rank mismatch", "adapter for sd15",
        "NaN adapter", "NaN weights", "Inf weights", "directory", "does not exist", "unreadable",
        "FIFO", "symlink loop",
    ],
    "run": [
        "run without checkpoints", "checkpoint truncated", "checkpoint state corrupt",
        "checkpoint without rng", "checkpoint with NaN student", "checkpoint holds a pickle",
        "empty folder", "does not exist", "a file",
    ],
    "prompts": [
        "empty file", "whitespace only", "latin-1 .txt", "UTF-16 .csv", "csv without the column",
        "jsonl without the key", "jsonl not JSON", "jsonl nested 100k deep", "junk .parquet",
        "unsupported suffix", "directory", "does not exist", "unreadable", "FIFO", "symlink loop",
    ],
    "config": [
        "unknown key", "wrong type", "boolean for an integer", "value out of range", "YAML syntax error",
        "TOML syntax error", "YAML list", "YAML python tag (code)", "latin-1 YAML", "unsupported suffix",
        "directory", "does not exist", "unreadable",
    ],
    "model": [
        "does not exist", "a file", "folder without model_index.json", "pipeline with a malicious .bin",
        "pipeline with a truncated U-Net", "symlink loop",
    ],
    "flags": ["unknown backbone"],
    "analyze-weights": ["unreadable", "FIFO", "symlink loop"],  # the others: analysis/bad_input
    "quantised": ["int8 weights"],
    "mis-scaled": ["B scaled by 1e30"],
}  # fmt: skip

#: (command, slot, kind) accepted by design (see the module docstring)
ACCEPTED = {("swap", s, k) for s in ("TEACHER", "STUDENT") for k in ("NaN weights", "Inf weights")}
ACCEPTED |= {
    ("analyze", "STUDENT quantised", "int8 weights"),
    ("merge", "ADAPTER mis-scaled", "B scaled by 1e30"),
}

#: kind -> what its one stderr line must say (an accepted kind: its one ``warning:`` line)
SAYS: dict[str, str] = {
    "FIFO": "is a FIFO (named pipe)",
    "symlink loop": "symbolic link loop",
    "malicious .ckpt": "holds pickled Python code",
    "malicious .bin": "holds pickled Python code",
    "unreadable": "Permission denied",
    "int8 weights": "are stored quantised (int8)",
    "B scaled by 1e30": "warning: ",
}


@dataclass(frozen=True)
class Case:
    command: str
    slot: str
    kind: str

    @property
    def id(self) -> str:
        return f"{self.command} {self.slot} | {self.kind}"

    @property
    def family(self) -> str:
        return SLOTS[(self.command, self.slot)][0]

    @property
    def accepted(self) -> bool:
        return (self.command, self.slot, self.kind) in ACCEPTED


def cases() -> list[Case]:
    return [Case(cmd, slot, kind) for (cmd, slot), (family, _) in SLOTS.items() for kind in KINDS[family]]


# ---- building the corpus ----------------------------------------------------------------------
@dataclass
class Corpus:
    root: Path
    pipe: Path
    run: Path
    base: Path
    adapter: Path
    merged: Path
    marker: Path
    files: dict[tuple[str, str], Path] = field(default_factory=dict)  # (family, kind) -> path
    unreadable: set[Path] = field(default_factory=set)


def _slice_header(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def _poisoned(path: Path, value: float, out: Path) -> Path:
    tensors, meta = _tensors(path)
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = value
    save_file(tensors, str(out), metadata=meta)
    return out


def _weights_files(c: Corpus, d: Path) -> dict[str, Path]:
    adapter = c.adapter.read_bytes()
    header, data = _slice_header(adapter)
    first = next(k for k in header if k != "__metadata__")
    f: dict[str, Path] = {}

    def put(kind: str, name: str, content: bytes) -> None:
        f[kind] = d / name
        f[kind].write_bytes(content)

    put("empty file", "empty.safetensors", b"")
    put("truncated safetensors", "truncated.safetensors", adapter[: len(adapter) // 2])
    lie = json.loads(json.dumps(header))
    b, e = lie[first]["data_offsets"]
    lie[first]["data_offsets"] = [b + 8, e + 8]
    put("header lies about offsets", "lying-offsets.safetensors", _with_header(lie, data))
    lie = json.loads(json.dumps(header))
    lie[first]["dtype"] = "F64"
    put("header lies about dtype", "lying-dtype.safetensors", _with_header(lie, data))
    put("huge header length", "huge-header.safetensors", struct.pack("<Q", 2**62) + b'{"a": 1}')
    put("random bytes", "random.safetensors", random.Random(0).randbytes(4096))
    tensors, meta = _tensors(c.adapter)
    buf = io.BytesIO()
    torch.save(tensors, buf)
    put("pickle renamed .safetensors", "pickle.safetensors", buf.getvalue())
    buf = io.BytesIO()
    torch.save({"state_dict": tensors, "callback": Payload(c.marker)}, buf)
    put("malicious .ckpt", "malicious.ckpt", buf.getvalue())
    put("malicious .bin", "malicious.bin", pickle.dumps({"weight": Payload(c.marker)}, protocol=2))
    a_key = next(k for k in tensors if k.endswith(".lorad_A"))
    bad = dict(tensors)
    bad[a_key] = torch.cat([tensors[a_key], tensors[a_key][:1]])  # one row too many for its weight
    f["adapter shapes do not fit"] = d / "adapter-shapes.safetensors"
    save_file(bad, str(f["adapter shapes do not fit"]), metadata=meta)
    bad = dict(tensors)
    b_key = a_key[: -len("_A")] + "_B"
    bad[b_key] = torch.cat([tensors[b_key], tensors[b_key][:1]])  # rank r+1 against A's r
    f["adapter rank mismatch"] = d / "adapter-rank.safetensors"
    save_file(bad, str(f["adapter rank mismatch"]), metadata=meta)
    sd15 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    f["adapter for sd15"] = d / "adapter-sd15.safetensors"
    save_file(
        {f"{sd15}.lorad_A": torch.randn(320, 4), f"{sd15}.lorad_B": torch.randn(4, 160)},
        str(f["adapter for sd15"]),
        metadata={**meta, "backbone": "sd15", "rank": "4", "targets": json.dumps([sd15])},
    )
    f["NaN adapter"] = _poisoned(c.adapter, float("nan"), d / "adapter-nan.safetensors")
    f["NaN weights"] = _poisoned(c.merged, float("nan"), d / "weights-nan.safetensors")
    f["Inf weights"] = _poisoned(c.merged, float("inf"), d / "weights-inf.safetensors")
    f["directory"] = d / "folder.safetensors"
    f["directory"].mkdir()
    f["does not exist"] = d / "missing.safetensors"
    put("unreadable", "unreadable.safetensors", adapter)
    c.unreadable.add(f["unreadable"])
    f.update(_special_files(d, ".safetensors"))
    return f


def _special_files(d: Path, suffix: str) -> dict[str, Path]:
    """A FIFO (opening it for reading would wait for a writer forever) and two symbolic
    links pointing at each other."""
    fifo, a, b = d / f"fifo{suffix}", d / f"loop-a{suffix}", d / f"loop-b{suffix}"
    os.mkfifo(fifo)
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    return {"FIFO": fifo, "symlink loop": a}


def _quantised_files(c: Corpus, d: Path) -> dict[str, Path]:
    """The base U-Net with its weight matrices stored as int8 codes (per-tensor absmax)."""
    tensors, meta = _tensors(c.base)
    for k, v in tensors.items():
        if k.endswith(".weight") and v.dim() >= 2:
            tensors[k] = (v / v.abs().max().clamp_min(1e-12) * 127).round().to(torch.int8)
    save_file(tensors, str(d / "int8.safetensors"), metadata=meta)
    return {"int8 weights": d / "int8.safetensors"}


def _mis_scaled_files(c: Corpus, d: Path) -> dict[str, Path]:
    """The adapter with every B factor multiplied by 1e30 (finite, absurd)."""
    tensors, meta = _tensors(c.adapter)
    tensors = {k: v * 1e30 if k.endswith(".lorad_B") else v for k, v in tensors.items()}
    save_file(tensors, str(d / "mis-scaled.safetensors"), metadata=meta)
    return {"B scaled by 1e30": d / "mis-scaled.safetensors"}


def _run_copy(c: Corpus, d: Path, name: str) -> tuple[Path, Path]:
    run = d / name
    shutil.copytree(c.run, run)
    return run, sorted((run / "checkpoints").iterdir())[-1]


def _run_files(c: Corpus, d: Path) -> dict[str, Path]:
    f: dict[str, Path] = {}
    run, ckpt = _run_copy(c, d, "no-checkpoints")
    shutil.rmtree(run / "checkpoints")
    f["run without checkpoints"] = run
    run, ckpt = _run_copy(c, d, "truncated")
    raw = (ckpt / "student.safetensors").read_bytes()
    (ckpt / "student.safetensors").write_bytes(raw[: len(raw) // 3])
    f["checkpoint truncated"] = run
    run, ckpt = _run_copy(c, d, "corrupt-state")
    (ckpt / "state.json").write_text('{"step": 1, "config": ')
    f["checkpoint state corrupt"] = run
    run, ckpt = _run_copy(c, d, "no-rng")
    (ckpt / "rng.safetensors").unlink()
    f["checkpoint without rng"] = run
    run, ckpt = _run_copy(c, d, "nan-student")
    _poisoned(ckpt / "student.safetensors", float("nan"), d / "nan-student.tmp")
    os.replace(d / "nan-student.tmp", ckpt / "student.safetensors")
    f["checkpoint with NaN student"] = run
    run, ckpt = _run_copy(c, d, "pickle-student")
    tensors, _ = _tensors(ckpt / "student.safetensors")
    with open(ckpt / "student.safetensors", "wb") as fh:
        torch.save({"t": tensors, "x": Payload(c.marker)}, fh)
    f["checkpoint holds a pickle"] = run
    f["empty folder"] = d / "empty-folder"
    f["empty folder"].mkdir()
    f["does not exist"] = d / "missing-run"
    f["a file"] = d / "notes.txt"
    f["a file"].write_text("not a run folder\n")
    return f


def _prompt_files(c: Corpus, d: Path) -> dict[str, Path]:
    f: dict[str, Path] = {}

    def put(kind: str, name: str, content: bytes) -> None:
        f[kind] = d / name
        f[kind].write_bytes(content)

    put("empty file", "empty.txt", b"")
    put("whitespace only", "blank.txt", b"  \n\t\n \n")
    put("latin-1 .txt", "latin1.txt", "un cercle rouge \xe0 gauche, caf\xe9\n".encode("latin-1"))
    put("UTF-16 .csv", "utf16.csv", "prompt\na red circle at the top left\n".encode("utf-16"))
    put("csv without the column", "caption.csv", b"caption\na red circle\n")
    put("jsonl without the key", "caption.jsonl", b'{"caption": "a red circle"}\n')
    put("jsonl not JSON", "broken.jsonl", b'{"prompt": "a red circle"\n')
    put("jsonl nested 100k deep", "deep.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    put("junk .parquet", "junk.parquet", random.Random(1).randbytes(2048))
    put("unsupported suffix", "prompts.docx", b"a red circle\n")
    f["directory"] = d / "folder.txt"
    f["directory"].mkdir()
    f["does not exist"] = d / "missing.txt"
    put("unreadable", "unreadable.txt", b"a red circle at the top left\n")
    c.unreadable.add(f["unreadable"])
    f.update(_special_files(d, ".txt"))
    return f


def _config_files(c: Corpus, d: Path) -> dict[str, Path]:
    f: dict[str, Path] = {}

    def put(kind: str, name: str, content: str, encoding: str = "utf-8") -> None:
        f[kind] = d / name
        f[kind].write_bytes(content.encode(encoding))

    put("unknown key", "unknown.yaml", "rnk: 3\n")
    put("wrong type", "type.toml", 'rank = "big"\n')
    put("boolean for an integer", "bool.yaml", "max_steps: true\n")
    put("value out of range", "range.yaml", "lr: -1\n")
    put("YAML syntax error", "syntax.yaml", "rank: [1, 2\n")
    put("TOML syntax error", "syntax.toml", "rank = = 3\n")
    put("YAML list", "list.yaml", "- 1\n- 2\n")
    code = f"rank: !!python/object/apply:builtins.open ['{c.marker}', 'w']\n"
    put("YAML python tag (code)", "tag.yaml", code)
    put("latin-1 YAML", "latin1.yaml", "prompts: caf\xe9.txt\n", "latin-1")
    put("unsupported suffix", "config.json", '{"rank": 4}')
    f["directory"] = d / "folder.yaml"
    f["directory"].mkdir()
    f["does not exist"] = d / "missing.yaml"
    put("unreadable", "unreadable.yaml", "rank: 4\n")
    c.unreadable.add(f["unreadable"])
    return f


def _model_files(c: Corpus, d: Path) -> dict[str, Path]:
    f: dict[str, Path] = {"does not exist": d / "missing-pipeline", "a file": c.adapter}
    f["folder without model_index.json"] = d / "not-a-pipeline"
    f["folder without model_index.json"].mkdir()
    evil = d / "evil-pipeline"
    shutil.copytree(c.pipe, evil)
    weights = evil / "unet" / "diffusion_pytorch_model.safetensors"
    tensors, _ = _tensors(weights)
    weights.unlink()
    torch.save({**tensors, "x": Payload(c.marker)}, evil / "unet" / "diffusion_pytorch_model.bin")
    f["pipeline with a malicious .bin"] = evil
    cut = d / "truncated-pipeline"
    shutil.copytree(c.pipe, cut)
    weights = cut / "unet" / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    f["pipeline with a truncated U-Net"] = cut
    loop_a, loop_b = d / "loop-a-pipeline", d / "loop-b-pipeline"
    loop_a.symlink_to(loop_b.name)
    loop_b.symlink_to(loop_a.name)
    f["symlink loop"] = loop_a
    return f


def build_corpus(root: Path, pipe: Path) -> Corpus:
    """Build every input of :func:`cases` under ``root`` from the tiny pipeline ``pipe``
    (a short distill run provides the run folder, adapter and merged student)."""
    from wadi_cli.distill import distill, resolve_config
    from wadi_cli.distill.export import export_run

    root.mkdir(parents=True, exist_ok=True)
    run = root / "run"
    over = dict(model=str(pipe), batch_size=2, max_steps=1, device="cpu", regression_weight=0.0)
    over.update(validate_every=0, tensorboard=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distill(resolve_config(overrides=over), run)
        export_run(run, "adapter", root / "adapter.safetensors")
        export_run(run, "merged", root / "merged.safetensors")
    finally:
        torch.set_num_threads(threads)
    c = Corpus(
        root=root,
        pipe=pipe,
        run=run,
        base=pipe / "unet" / "diffusion_pytorch_model.safetensors",
        adapter=root / "adapter.safetensors",
        merged=root / "merged.safetensors",
        marker=root / "PAYLOAD-RAN",
    )
    makers = {"weights": _weights_files, "run": _run_files, "prompts": _prompt_files}
    makers.update(config=_config_files, model=_model_files, quantised=_quantised_files)
    makers["mis-scaled"] = _mis_scaled_files
    for family, make in makers.items():
        folder = root / f"bad-{family}"
        folder.mkdir()
        for kind, path in make(c, folder).items():
            c.files[(family, kind)] = path
    c.files[("flags", "unknown backbone")] = Path("sd99")
    for kind in KINDS["analyze-weights"]:
        c.files[("analyze-weights", kind)] = c.files[("weights", kind)]
    if not ROOT_SIMULATES_UNREADABLE:
        for path in c.unreadable:
            path.chmod(0)
    return c


# ---- running a case -----------------------------------------------------------------------------
@contextlib.contextmanager
def unreadable(paths: set[Path]) -> Iterator[None]:
    """As root every file is readable, so reads of ``paths`` are refused here the way the OS
    refuses them for other users (``PermissionError``, errno 13) at every open the code uses."""
    if not ROOT_SIMULATES_UNREADABLE:
        yield
        return
    denied = {str(p) for p in paths}
    real_open, real_os_open = builtins.open, os.open

    def check(file: object) -> None:
        if isinstance(file, str | os.PathLike) and os.path.abspath(os.fspath(file)) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(file))

    def guarded_open(file, *args, **kwargs):
        check(file)
        return real_open(file, *args, **kwargs)

    def guarded_os_open(path, *args, **kwargs):
        check(path)
        return real_os_open(path, *args, **kwargs)

    real_access = os.access

    def guarded_access(path, mode, *args, **kwargs):  # what Click's readability check asks
        if isinstance(path, str | os.PathLike) and os.path.abspath(os.fspath(path)) in denied:
            return not mode & (os.R_OK | os.W_OK)
        return real_access(path, mode, *args, **kwargs)

    builtins.open, io.open, os.open, os.access = guarded_open, guarded_open, guarded_os_open, guarded_access
    try:
        yield
    finally:
        builtins.open, io.open, os.open, os.access = real_open, real_open, real_os_open, real_access


@dataclass
class Result:
    case: Case
    args: list[str]
    exit_code: int
    stderr_lines: list[str]
    stdout: str
    out_written: list[str]
    input_changed: bool
    payload_ran: bool
    unraisable: list[str] = field(default_factory=list)  # what Python would print as "Exception ignored"

    @property
    def message(self) -> str:
        return self.stderr_lines[0] if self.stderr_lines else ""

    def problems(self) -> list[str]:
        """How the result breaks the rule (empty: the case passes)."""
        bad = []
        if self.payload_ran:
            bad.append("code from the file ran")
        if self.unraisable:
            bad.append(f"'Exception ignored' on stderr: {self.unraisable}")
        says = SAYS.get(self.case.kind)
        if says and (len(self.stderr_lines) != 1 or says not in self.message):
            bad.append(f"stderr is not one line saying {says!r}: {self.stderr_lines!r}")
        if self.case.accepted:
            if self.exit_code != 0:
                bad.append(f"exit {self.exit_code} for an accepted input")
            return bad
        if self.exit_code == 0:
            bad.append("exit 0")
        if len(self.stderr_lines) != 1 or not self.message.startswith("error: "):
            bad.append(f"stderr is not one 'error:' line: {self.stderr_lines!r}")
        if "Traceback" in self.stdout or "Traceback" in "\n".join(self.stderr_lines):
            bad.append("traceback")
        if self.out_written:
            bad.append(f"wrote {self.out_written}")
        if self.input_changed:
            bad.append("changed its input run folder")
        return bad


def _snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    """Every entry of a folder with its size and modification time (any write changes them)."""
    if not path.is_dir():
        return None
    stats = {p: p.stat() for p in sorted(path.rglob("*"))}
    return {str(p.relative_to(path)): (st.st_size, st.st_mtime_ns) for p, st in stats.items()}


def run_case(c: Corpus, case: Case, workdir: Path) -> Result:
    """Run one case with ``--out`` in the empty folder ``workdir``."""
    from typer.testing import CliRunner

    from wadi_cli.cli.main import app

    family, template = SLOTS[(case.command, case.slot)]
    bad = c.files[(family, case.kind)]
    out = workdir / ("out.safetensors" if case.command in ("swap", "merge", "export") else "out")
    values = {"bad": bad, "out": out, "pipe": c.pipe, "run": c.run, "base": c.base}
    values.update(adapter=c.adapter, merged=c.merged)
    args = [a.format(**{k: str(v) for k, v in values.items()}) for a in template]
    if case.slot == "--checkpoint":  # a checkpoint folder of the bad run (or the bad path itself)
        inner = sorted((bad / "checkpoints").iterdir()) if (bad / "checkpoints").is_dir() else []
        args[args.index(str(bad))] = str(inner[-1] if inner else bad)
    before = _snapshot(bad) if family == "run" else None
    ignored: list[str] = []
    hook, sys.unraisablehook = (
        sys.unraisablehook,
        lambda u: ignored.append(f"{u.exc_type.__name__}: {u.exc_value}"),
    )
    try:
        with unreadable(c.unreadable):
            result = CliRunner().invoke(app, args)
            exit_code, stderr_text, stdout = result.exit_code, result.stderr, result.stdout
            del result  # its exception chain holds the objects the command left behind
            gc.collect()  # a half-built reader's __del__ runs here, as it would at exit
    finally:
        sys.unraisablehook = hook
    stderr = [ln for ln in stderr_text.splitlines() if ln.strip()]
    written = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else []
    return Result(
        case=case,
        args=args,
        exit_code=exit_code,
        stderr_lines=stderr,
        stdout=stdout,
        out_written=written,
        input_changed=before is not None and _snapshot(bad) != before,
        payload_ran=c.marker.exists(),
        unraisable=ignored,
    )
