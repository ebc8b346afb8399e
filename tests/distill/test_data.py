"""Prompt files and the resumable prompt stream."""

from __future__ import annotations

import json

import pytest

from wadi_cli.distill.data import SMOKE_PROMPTS, PromptStream, load_prompts, read_prompt_file
from wadi_cli.errors import BadInputError


def test_txt_skips_blank_lines_and_normalises_space(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a  cat\n\n   \n a dog \n")
    assert read_prompt_file(p) == ["a cat", "a dog"]


def test_jsonl_and_csv_columns(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text(
        json.dumps({"caption": "one"})
        + "\n\n"
        + json.dumps({"caption": " "})
        + "\n"
        + json.dumps({"caption": "two"})
    )
    assert read_prompt_file(j, "caption") == ["one", "two"]
    with pytest.raises(BadInputError, match="prompt-column"):
        read_prompt_file(j, "prompt")
    c = tmp_path / "p.csv"
    c.write_text('id,text\n1,"hello, world"\n2,\n3,bye\n')
    assert read_prompt_file(c, "text") == ["hello, world", "bye"]
    with pytest.raises(BadInputError, match="no column"):
        read_prompt_file(c, "prompt")


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["x", "", None, "y"]}).to_parquet(path)
    assert read_prompt_file(path) == ["x", "y"]


@pytest.mark.parametrize("content", ["", "   \n\n\t\n"])
def test_empty_or_whitespace_file_is_refused(tmp_path, content):
    p = tmp_path / "p.txt"
    p.write_text(content)
    with pytest.raises(BadInputError, match="no prompts"):
        read_prompt_file(p)


def test_missing_unreadable_and_unsupported(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        read_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(BadInputError, match="unsupported"):
        read_prompt_file(tmp_path / "p.xlsx")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(BadInputError, match="cannot read"):
        read_prompt_file(tmp_path / "bin.txt")


def test_builtin_sets():
    assert load_prompts(None, backbone="sd15") == list(SMOKE_PROMPTS)
    tiny = load_prompts(None, backbone="tiny")
    assert len(tiny) == 1024 and all(p.startswith("a ") for p in tiny)


def test_stream_is_a_permutation_per_epoch_and_resumes_exactly():
    prompts = [f"p{i}" for i in range(7)]
    s = PromptStream(prompts, seed=3)
    first = s.next_batch(7)
    assert sorted(first) == sorted(prompts) and first != prompts  # shuffled, every prompt once
    straight = PromptStream(prompts, seed=3)
    seq = [straight.next_batch(3) for _ in range(6)]
    resumed_a = PromptStream(prompts, seed=3)
    part = [resumed_a.next_batch(3) for _ in range(2)]
    resumed_b = PromptStream(prompts, seed=3, position=resumed_a.position)
    part += [resumed_b.next_batch(3) for _ in range(4)]
    assert part == seq
    assert PromptStream(prompts, seed=4).next_batch(7) != first
