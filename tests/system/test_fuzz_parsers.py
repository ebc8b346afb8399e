"""Property-based fuzzing of the parsers of untrusted files: the safetensors header reader
(``wadi_cli/io/safetensors_reader.py``) and the prompt readers (``wadi_cli/io/prompts.py``).

Random bytes, valid files with random mutations (bit flips, cuts, insertions, a forged
header length) and random headers built from the format's own vocabulary must only ever
raise our own errors (:class:`~wadi_cli.errors.WadiError`), and a small file must never make
the parser allocate much: the Python heap's peak (tracemalloc) stays under a bound, and
every tensor a header admits lies inside the file (so reading it allocates at most the
file's size). The default suite runs a few hundred examples per property; the ``slow``
variants run thousands.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_bytes

from wadi_cli.errors import WadiError
from wadi_cli.io.prompts import read_prompt_file
from wadi_cli.io.safetensors_reader import DTYPES, SafetensorsFile

MAX_FILE = 4096  # bytes of every fuzzed file
PEAK_BOUND = 2 << 20  # bytes of Python heap a parse of such a file may take at its peak
FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _valid_safetensors() -> list[bytes]:
    """A few well-formed files: several dtypes, an empty tensor, a scalar, metadata."""
    return [
        save_bytes(
            {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.int64)}
        ),
        save_bytes(
            {"w": torch.zeros(4, 2, dtype=torch.float16), "s": torch.tensor(1.5), "e": torch.zeros(0)},
            metadata={"format": "pt", "rank": "4"},
        ),
        save_bytes({"x.lorad_A": torch.randn(8, 2), "x.lorad_B": torch.randn(2, 4, dtype=torch.bfloat16)}),
    ]


VALID = _valid_safetensors()


@contextlib.contextmanager
def _file(data: bytes, suffix: str) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="wadi-fuzz-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield Path(name)
    finally:
        os.unlink(name)


@contextlib.contextmanager
def _bounded_heap() -> Iterator[None]:
    """Fail if the Python heap grows more than :data:`PEAK_BOUND` inside the block."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
    assert peak < PEAK_BOUND, f"parsing a {MAX_FILE}-byte file peaked at {peak} bytes of Python heap"


def _read_safetensors(data: bytes) -> None:
    """Open and read every tensor; only our errors may come out."""
    with _file(data, ".safetensors") as path, _bounded_heap():
        try:
            with SafetensorsFile(path) as f:
                for name in f.keys():  # noqa: SIM118 - not a dict
                    info = f.info(name)
                    assert 8 <= info.begin <= info.end <= len(data)  # allocation bounded by the file
                    t = f.get(name)
                    assert t.numel() == info.numel and t.dtype == info.dtype
        except WadiError:
            pass


def _mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "cut", "insert", "length", "header"]))
    b = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    elif kind == "cut":
        b = b[: draw(st.integers(0, len(b)))]
    elif kind == "insert":
        at = draw(st.integers(0, len(b)))
        b[at:at] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "length":  # a forged header length
        b[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 4 * len(b)), st.integers(0, 2**64 - 1))))
    else:  # the header's JSON text edited in place
        (n,) = struct.unpack("<Q", bytes(b[:8]))
        at = draw(st.integers(8, 8 + n - 1))
        b[at] = draw(st.sampled_from(list(b'{}[]",:0123456789-eE.')))
    return bytes(b[:MAX_FILE])


_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=4), st.integers()),
        "shape": st.one_of(
            st.lists(st.integers(-2, 6), max_size=3),
            st.lists(st.integers(0, 2**62), max_size=3),
            st.text(max_size=3),
            st.none(),
        ),
        "data_offsets": st.one_of(
            st.lists(st.integers(-4, 200), min_size=0, max_size=3),
            st.lists(st.integers(0, 2**64), min_size=2, max_size=2),
            st.lists(st.floats(allow_nan=True), min_size=2, max_size=2),
        ),
    }
)
_header = st.dictionaries(
    st.one_of(st.text(max_size=6), st.just("__metadata__")),
    st.one_of(_entry, st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2), st.integers()),
    max_size=4,
)


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return (struct.pack("<Q", len(raw)) + raw + data)[:MAX_FILE]


def prop_random_bytes_safetensors(data: bytes) -> None:
    _read_safetensors(data)


def prop_mutated_safetensors(data) -> None:
    _read_safetensors(_mutate(data.draw(st.sampled_from(VALID)), data.draw))


def prop_random_headers(header: dict, payload: bytes) -> None:
    _read_safetensors(_with_header(header, payload))


test_safetensors_random_bytes = FAST(given(st.binary(max_size=MAX_FILE))(prop_random_bytes_safetensors))
test_safetensors_mutated_files = FAST(given(st.data())(prop_mutated_safetensors))
test_safetensors_random_headers = FAST(given(_header, st.binary(max_size=256))(prop_random_headers))
test_safetensors_random_bytes_long = pytest.mark.slow(
    SLOW(given(st.binary(max_size=MAX_FILE))(prop_random_bytes_safetensors))
)
test_safetensors_mutated_files_long = pytest.mark.slow(SLOW(given(st.data())(prop_mutated_safetensors)))
test_safetensors_random_headers_long = pytest.mark.slow(
    SLOW(given(_header, st.binary(max_size=256))(prop_random_headers))
)


def test_a_deeply_nested_header_is_a_corrupt_header_not_a_crash():
    """Found while writing these properties: json's RecursionError escaped the reader."""
    deep = b"{" + b'"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(WadiError, match="invalid JSON"):
        _read_or_raise(struct.pack("<Q", len(deep)) + deep)


def _read_or_raise(data: bytes) -> None:
    with _file(data, ".safetensors") as path, SafetensorsFile(path) as f:
        [f.get(k) for k in f.keys()]  # noqa: SIM118 - not a dict


# ---- prompt files -------------------------------------------------------------------------
def _valid_prompt_files() -> list[tuple[str, bytes]]:
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame({"prompt": ["a red circle", None, "a blue square"], "n": [1, 2, 3]}).to_parquet(buf)
    return [
        (".txt", b"# comment\na red circle at the top left\n\n  a blue square  \n"),
        (".jsonl", b'{"prompt": "a red circle"}\n{"prompt": "a \\u00e9 square", "x": [1, {"y": null}]}\n'),
        (".csv", b'prompt,other\n"a red, circle",1\na blue square,2\n'),
        (".parquet", buf.getvalue()),
    ]


PROMPT_FILES = _valid_prompt_files()
SUFFIXES = [".txt", ".jsonl", ".csv", ".parquet"]


def _read_prompts(data: bytes, suffix: str) -> None:
    with _file(data[:MAX_FILE], suffix) as path, _bounded_heap():
        try:
            prompts = read_prompt_file(path)
            assert prompts and all(isinstance(p, str) and p for p in prompts)
        except WadiError:
            pass


def prop_random_prompt_bytes(data: bytes, suffix: str) -> None:
    _read_prompts(data, suffix)


def prop_mutated_prompt_files(data) -> None:
    suffix, raw = data.draw(st.sampled_from(PROMPT_FILES))
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and b:
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        elif op == "cut":
            b = b[: data.draw(st.integers(0, len(b)))]
        else:
            at = data.draw(st.integers(0, len(b)))
            b[at:at] = data.draw(
                st.sampled_from([b"\x00", b'"', b",", b"\n", b"{", b"[", b"\xff\xfe", b"\r"])
            )
    _read_prompts(bytes(b), suffix)


test_prompts_random_bytes = FAST(
    given(st.binary(max_size=MAX_FILE), st.sampled_from(SUFFIXES))(prop_random_prompt_bytes)
)
test_prompts_mutated_files = FAST(given(st.data())(prop_mutated_prompt_files))
test_prompts_random_bytes_long = pytest.mark.slow(
    SLOW(given(st.binary(max_size=MAX_FILE), st.sampled_from(SUFFIXES))(prop_random_prompt_bytes))
)
test_prompts_mutated_files_long = pytest.mark.slow(SLOW(given(st.data())(prop_mutated_prompt_files)))


def _flipped_parquet() -> bytes:
    raw = bytearray(dict(PROMPT_FILES)[".parquet"])
    raw[24] = 128  # the slow fuzz run's example: pyarrow raised ArrowException ("Wrapping ... failed")
    return bytes(raw)


@pytest.mark.parametrize(
    ("suffix", "content"),
    [
        (".jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),  # RecursionError in json
        (".csv", b"prompt\n" + b"a" * 200_000 + b"\n"),  # csv.Error: a field over csv's 128 KiB limit
        (".parquet", _flipped_parquet()),  # pyarrow's own exception type
    ],
    ids=["jsonl-deep", "csv-long-field", "parquet-flipped-byte"],
)
def test_prompt_files_found_by_fuzzing(suffix, content):
    """Inputs that escaped the reader (RecursionError, csv.Error, ArrowException) before the fix."""
    with _file(content, suffix) as path, contextlib.suppress(WadiError):
        read_prompt_file(path)
