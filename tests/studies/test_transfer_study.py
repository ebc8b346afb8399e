"""analysis/transfer_study/transfer.py: its plan (``--dry-run``) and the committed results
(every row the README's table names, from the full settings, not ``--quick``)."""

from __future__ import annotations

import json

from _helpers_scripts import ANALYSIS, load_analysis_script

transfer = load_analysis_script("transfer_study/transfer.py")


def test_dry_run_plans_both_merges_and_one_distill_per_seed(capsys):
    assert transfer.main(["--dry-run", "--seeds", "0", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    merges = [ln for ln in lines if ln.startswith("wadi merge WORK/ft/unet")]
    assert len(merges) == 3 and any("student.safetensors" in ln for ln in merges)
    distills = [
        ln for ln in lines if ln.startswith("wadi distill -b tiny --model WORK/ft --config tiny_paper")
    ]
    assert [ln.split("--seed ")[1].split()[0] for ln in distills] == ["0", "3"]
    assert not any("--max-steps" in ln for ln in distills)


def test_committed_results_hold_every_case_at_full_settings():
    data = json.loads((ANALYSIS / "transfer_study" / "results" / "transfer.json").read_text())
    assert data["quick"] is False and data["hp"]["eval"]["num_images"] == 500
    names = [r["name"] for r in data["rows"]]
    for case in ("(a)", "(b)", "(c)", "(d)", "fine-tune teacher"):
        assert any(n.startswith(case) for n in names), case
    assert tuple(data["shift_background_rgb_factor"]) == transfer.SHIFT
