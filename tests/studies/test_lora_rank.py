"""analysis/lora_rank/lora_rank.py, the LoRA-rank study on tiny: its plan, its rank-2 LoRA
against an independent numpy SVD (through diffusers' ``load_lora_weights`` + ``fuse_lora``),
the committed table as the committed CSV makes it, and the docs quoting that table. The
slow test runs the script end to end on 16 images."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from _helpers_scripts import ANALYSIS, load_analysis_script

from wadi_cli.io import load_state_dict

study = load_analysis_script("lora_rank/lora_rank.py")
RESULTS = ANALYSIS / "lora_rank" / "results"
DOCS = ANALYSIS.parent / "docs" / "using-exports.md"


def test_dry_run_prints_one_eval_per_rule_and_seed(capsys):
    assert study.main(["--dry-run", "--seeds", "3", "7", "-n", "40"]) == 0
    lines = capsys.readouterr().out.splitlines()
    evals = [line for line in lines if line.startswith("wadi eval -b tiny")]
    rules = len(study.RANKS) + len(study.ENERGIES)
    assert len(evals) == 2 * rules + 2 * 2  # every rule and the two references, per seed
    assert all(line.endswith(("-n 40 --seed 3 --json", "-n 40 --seed 7 --json")) for line in evals)
    assert sum("--base" in line for line in evals) == 2


def _numpy_truncation(delta: torch.Tensor, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_rank_two_lora_is_fused_by_diffusers_as_base_plus_the_truncated_change(tmp_path, one_thread):
    """The fused file the study evaluates is base + ΔW_2 (numpy's SVD of the shipped student's
    change) and its recorded total error is ‖ΔW − ΔW_2‖ / ‖ΔW‖ over all changed layers."""
    base, merged, alpha = study.student_change()
    fields, weights = study.make_lora("rank=2", base, merged, alpha, tmp_path)
    fused = load_state_dict(weights)
    residual = total = 0.0
    changed = 0
    for k, w in base.items():
        delta = merged[k].double() - w.double()
        if not delta.any():
            assert torch.equal(fused[k], w), k
            continue
        changed += 1
        low = torch.from_numpy(_numpy_truncation(delta, 2))
        torch.testing.assert_close(fused[k].double(), w.double() + low, rtol=0, atol=2e-6)
        residual += float(((delta - low) ** 2).sum())
        total += float((delta**2).sum())
    assert changed == 92  # the LoRaD student's Linear layers
    assert fields["total_rel_error"] == pytest.approx(math.sqrt(residual / total), rel=1e-9)
    assert (fields["rank_min"], fields["rank_max"], fields["rule"]) == (2, 2, "rank 2")
    assert fields["max_fuse_error"] < 2e-6 and alpha == 0.0047


def _committed_rows() -> list[dict[str, str]]:
    with (RESULTS / "lora_rank.csv").open() as f:
        return list(csv.DictReader(f))


def test_committed_table_is_the_committed_csv(tmp_path):
    rows = _committed_rows()
    rules = {r["rule"] for r in rows}
    expected = {f"rank {r}" for r in study.RANKS} | {f"energy {e:g}" for e in study.ENERGIES}
    assert rules == expected | {"merged student", "undistilled base (one step)"}
    assert all(sum(r["rule"] == rule for r in rows) == 2 for rule in rules)  # seeds 0 and 1
    errors = [float(r["total_rel_error"]) for r in rows if r["rule"].startswith("rank ")]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    args = study.parse(["--seeds", "0", "1", "-n", "500", "--out", str(tmp_path)])
    parsed = [{k: (v if v == "" or k == "rule" else float(v)) for k, v in r.items()} for r in rows]
    for r in parsed:
        for k in ("rank_min", "rank_max", "parameters", "seed"):
            r[k] = r[k] if r[k] == "" else int(r[k])
    study.write_results(parsed, tmp_path, args)
    assert (tmp_path / "lora_rank.md").read_text() == (RESULTS / "lora_rank.md").read_text()
    assert (RESULTS / "lora_rank.png").stat().st_size > 10_000


def test_docs_quote_the_study():
    """docs/using-exports.md's LoRA table rows are the study's seed means."""
    docs = DOCS.read_text()
    assert "analysis/lora_rank" in docs
    for row in study.summary(_committed_rows()):
        assert f"{row['accuracy']:.3f} | {row['fd']:.2f} |" in docs, row["rule"]


@pytest.mark.slow
def test_the_script_runs_end_to_end_on_sixteen_images(tmp_path):
    out = tmp_path / "results"
    assert study.main(["--ranks", "2", "--energies", "--seeds", "0", "-n", "16", "--out", str(out)]) == 0
    with (out / "lora_rank.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["rule"] for r in rows] == ["rank 2", "merged student", "undistilled base (one step)"]
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["fd"]) > 0 for r in rows)
    assert (out / "lora_rank.png").stat().st_size > 10_000 and (out / "lora_rank.md").is_file()
