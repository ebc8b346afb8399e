"""analysis/sdxl_distillers/run.py on the SDXL miniature: "distillers" made from the miniature
base with planted changes (a known norm change in one group, a known direction change in
another), so the table's numbers are checked against the planted truth; absent students and
the pickle-only DMD2 release are skipped with a line; each block's ``wadi analyze --filter``
gives the study's group numbers."""

from __future__ import annotations

import json
import shutil

import pytest
from _helpers_cli import wadi
from _helpers_hub import COMMIT, SDXL, hub_cache_in_use
from _helpers_scripts import load_analysis_script
from safetensors.torch import save_file

from wadi_cli.io import load_state_dict

study = load_analysis_script("sdxl_distillers/run.py")


@pytest.fixture(scope="module")
def hub_cache():
    with hub_cache_in_use() as cache:
        yield cache


def _save(state, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def test_the_pair_list_names_every_published_student():
    from wadi_cli.io.hub_files import analysis_pairs, recorded_repos

    pairs = analysis_pairs("sdxl")
    assert pairs["teacher"] == SDXL
    names = [s["name"] for s in pairs["students"]]
    assert names == ["SDXL-Turbo", "SDXL-Lightning", "DMD2-SDXL", "Hyper-SDXL"]
    for s in pairs["students"]:
        assert s["repo"] in recorded_repos()
        assert s["file"] is None or s["file"] in recorded_repos()[s["repo"]]["files"]
    with pytest.raises(KeyError, match="no analysis pairs recorded for 'sd15'"):
        analysis_pairs("sd15")


def test_study_on_planted_distillers(hub_cache, tmp_path, capsys):
    snap = hub_cache / f"models--{SDXL.replace('/', '--')}" / "snapshots" / COMMIT
    base = load_state_dict(snap / "unet")
    weights = tmp_path / "students"
    # SDXL-Turbo: a diffusers repo folder, every matrix scaled by 1.02 (norm 0.02, direction 0)
    turbo = {k: v * 1.02 if v.ndim >= 2 else v for k, v in base.items()}
    _save(turbo, weights / "sdxl-turbo" / "unet" / "diffusion_pytorch_model.safetensors")
    shutil.copy(snap / "unet" / "config.json", weights / "sdxl-turbo" / "unet" / "config.json")
    # SDXL-Lightning: only the up blocks' attention matrices, scaled by 1.07
    up_attn = {k for k in base if base[k].ndim >= 2 and k.startswith("up_blocks.") and ".attentions." in k}
    lightning = {k: v * 1.07 if k in up_attn else v for k, v in base.items()}
    _save(lightning, weights / "sdxl_lightning_1step_unet_x0.safetensors")
    # DMD2: its .bin is junk (opening it would fail); the converted copy negates every row of
    # the down blocks' resnet matrices (direction change exactly 2, norm change 0)
    (weights / "dmd2_sdxl_1step_unet_fp16.bin").write_bytes(b"not a pickle at all")
    down_res = {k for k in base if base[k].ndim >= 2 and k.startswith("down_blocks.") and ".resnets." in k}
    dmd2 = {k: -v if k in down_res else v for k, v in base.items()}
    out = tmp_path / "results"
    assert study.main(["--teacher", str(snap), "--weights-dir", str(weights), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped Hyper-SDXL: missing Hyper-SDXL-1step-Unet.safetensors" in printed
    assert "skipped DMD2-SDXL: missing dmd2_sdxl_1step_unet_fp16.safetensors" in printed
    assert "a pickle, which this study never opens" in printed and "weights_only=True" in printed

    _save(dmd2, weights / "dmd2_sdxl_1step_unet_fp16.safetensors")
    assert study.main(["--teacher", str(snap), "--weights-dir", str(weights), "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    got = doc["students"]
    assert list(got) == ["SDXL-Turbo", "SDXL-Lightning", "DMD2-SDXL"]
    assert got["SDXL-Turbo"]["overall"]["norm_rel_change_mean"] == pytest.approx(0.02, rel=1e-4)
    assert got["SDXL-Turbo"]["overall"]["direction_change_mean"] < 1e-3
    light = got["SDXL-Lightning"]["groups"]
    assert light["up/attentions"]["norm_rel_change_mean"] == pytest.approx(0.07, rel=1e-4)
    assert all(g["norm_rel_change_mean"] < 1e-6 for k, g in light.items() if k != "up/attentions")
    dm = got["DMD2-SDXL"]["groups"]
    assert dm["down/resnets"]["direction_change_mean"] == pytest.approx(2.0, rel=1e-5)
    assert dm["down/resnets"]["norm_rel_change_mean"] < 1e-6
    assert all(g["direction_change_mean"] < 1e-3 for k, g in dm.items() if k != "down/resnets")
    table = (out / "table.md").read_text()
    assert "| DMD2-SDXL | down/resnets |" in table and (out / "norm_vs_direction.png").stat().st_size > 10_000

    # the same group through the CLI's --filter, as typed
    pattern = study.FILTERS["up"] + r".*" + study.FILTERS["attentions"]
    lightning_file = weights / "sdxl_lightning_1step_unet_x0.safetensors"
    r = wadi("analyze", snap, lightning_file, "--filter", pattern, "--json")
    overall = json.loads(r.stdout[r.stdout.index("{") :])["overall"]
    assert overall["layers"] == light["up/attentions"]["layers"] == len(up_attn)
    assert overall["norm_rel_change_mean"] == pytest.approx(light["up/attentions"]["norm_rel_change_mean"])


def test_nothing_present_writes_nothing(hub_cache, tmp_path, capsys):
    snap = hub_cache / f"models--{SDXL.replace('/', '--')}" / "snapshots" / COMMIT
    out = tmp_path / "results"
    assert study.main(["--teacher", str(snap), "--weights-dir", str(tmp_path), "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert printed.out.count("skipped ") == 4 and "hf download stabilityai/sdxl-turbo" in printed.out
    assert not out.exists()
