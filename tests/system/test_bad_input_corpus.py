"""The bad-input corpus (``_helpers_corpus.py``): every command that reads files, every kind
of broken or hostile input. Each case: a non-zero exit, one ``error:`` line on stderr and no
traceback, nothing written at ``--out``, input run folders untouched, no code from the file
executed. The table of results is ``analysis/bad_input/`` (``python analysis/bad_input/table.py``).
"""

from __future__ import annotations

import pytest
from _helpers_corpus import KINDS, build_corpus, cases, run_case
from _helpers_sample import tiny_pipeline_dir


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"), tiny_pipeline_dir())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(built, case, tmp_path):
    result = run_case(built, case, tmp_path)
    assert not result.problems(), f"{case.id}: {result.problems()} (exit {result.exit_code})"


def test_the_corpus_is_what_the_issue_asks_for():
    kinds = {k for family in KINDS.values() for k in family}
    needed = [
        "empty file", "truncated safetensors", "header lies about offsets", "header lies about dtype",
        "huge header length", "pickle renamed .safetensors", "malicious .ckpt", "malicious .bin",
        "adapter shapes do not fit", "adapter for sd15", "NaN weights", "Inf weights",
        "run without checkpoints",
        "checkpoint truncated", "latin-1 .txt", "csv without the column", "unknown key", "wrong type",
        "directory", "does not exist", "unreadable",
    ]  # fmt: skip
    assert set(needed) <= kinds
    commands = {c.command for c in cases()}
    assert commands == {"sample", "eval", "swap", "merge", "export", "distill", "info", "analyze"}
    assert {c.slot for c in cases() if c.command == "distill"} == {
        "--prompts", "--config", "--resume", "--model"
    }  # fmt: skip
