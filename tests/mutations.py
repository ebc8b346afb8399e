"""Mutation check: break one line of the package at a time and prove a test notices.

Each entry of :data:`MUTATIONS` names a file, one exact line fragment that must occur
exactly once, its broken replacement, and the smallest selection of tests that must then
fail. The package and tests are copied to a temporary folder per worker and the copy is
imported through ``PYTHONPATH`` (the working tree is never modified). The run fails when
a fragment is missing (the code moved: update this list), when the unmutated copy does not
pass the selected tests, or when any mutation survives.

    python tests/mutations.py                    # every mutation, baseline first
    python tests/mutations.py --only ema-formula-swap regression-sign
    python tests/mutations.py --skip-baseline --write analysis/results/mutation_check.md   # CI

CI runs it after the default suite has passed (that is the baseline there).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

REF = "tests/distill/test_trainer_reference.py::test_two_steps_match_the_float64_reference_update_for_update"
FP16 = "tests/distill/test_trainer_reference.py::test_mixed_precision_gradients_match_the_reference_within_rounding[fp16]"  # noqa: E501
QUALITY = (
    "tests/system/test_distill_quality.py::test_a_short_distillation_beats_the_undistilled_one_step_base"  # noqa: E501
)


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


M = Mutation
TRAINER = "wadi_cli/distill/trainer.py"
SDXL = "tests/system/test_family_sdxl.py::test_conditioning_equals_diffusers_sdxl_pipeline"
RECIPE = "wadi_cli/distill/recipe.py"
LOSSES = "wadi_cli/distill/losses.py"
SWAP = "wadi_cli/swap/core.py"
MEMORY = "wadi_cli/distill/memory.py"

MUTATIONS: tuple[Mutation, ...] = (
    # ---- the training loop -----------------------------------------------------------------
    M("ema-formula-swap", "EMA: (1−d)·ema + d·v instead of d·ema + (1−d)·v", "wadi_cli/distill/ema.py",
      "self.shadow[k].mul_(decay).add_(v.float(), alpha=1 - decay)",
      "self.shadow[k].mul_(1 - decay).add_(v.float(), alpha=decay)", (REF,)),
    M("regression-sign", "regression term subtracted from the generator loss", TRAINER,
      "loss_g = loss_g + loss_r", "loss_g = loss_g - loss_r", (REF,)),
    M("fp16-no-loss-scaling", "mixed precision: backward of the unscaled loss (GradScaler still unscales)",
      RECIPE, "self.scalers[name].scale(loss).backward()", "loss.backward()", (FP16,)),
    M("fp16-clip-before-unscale", "mixed precision: clipping sees the scaled gradients", RECIPE,
      "scaler.unscale_(opt)", "pass", (FP16,)),
    M("generator-loss-sign", "VSD generator loss pushes along +g", LOSSES,
      "target = (x - g.to(x.dtype)).detach()", "target = (x + g.to(x.dtype)).detach()", (QUALITY, REF)),
    M("teacher-fake-swap", "VSD gradient with teacher and fake score swapped", TRAINER,
      "generator_loss(x0, vsd_gradient(eps_real, eps_fake, ab))",
      "generator_loss(x0, vsd_gradient(eps_fake, eps_real, ab))", (QUALITY, REF)),
    M("zero-lr", "both learning rates set to 0", RECIPE,
      'group["lr"] = base_lr * scale', 'group["lr"] = 0.0 * base_lr * scale', (QUALITY, REF)),
    M("fake-accumulation-scale", "fake-score loss not divided by the micro-batch count", TRAINER,
      'self._backward("fake", loss_f / k)', 'self._backward("fake", loss_f)', (REF,)),
    M("stale-fake-samples", "extra fake updates reuse the old student samples", TRAINER,
      "            if j > 0:", "            if j > 1:", (REF,)),
    M("no-clipping", "gradient clipping disabled", RECIPE,
      "norm = torch.nn.utils.clip_grad_norm_(params, max_norm)",
      'norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))', (REF,)),
    M("cfg-halves-swapped", "batched CFG with conditional and unconditional halves swapped", TRAINER,
      "torch.cat([x_t, x_t]), torch.cat([t, t]), TextCondition.cat([uncond, cond])",
      "torch.cat([x_t, x_t]), torch.cat([t, t]), TextCondition.cat([cond, uncond])", (REF,)),
    M("fake-noise-reused", "fake update noised with the VSD noise instead of its own", TRAINER,
      'x_tf = add_noise(x0, d["eps_fake"], ab_f)', 'x_tf = add_noise(x0, d["eps"], ab_f)', (REF,)),
    M("prompt-dropout-inverted", "prompt dropout keeps the dropped rows", TRAINER,
      "keep = ~drop.reshape(-1, 1, 1)", "keep = drop.reshape(-1, 1, 1)", (REF,)),
    M("sdxl-last-hidden-state", "SDXL prompts from the last hidden states, not the penultimate",
      "wadi_cli/diffusion/text.py", "hidden.append(out.hidden_states[-2])",
      "hidden.append(out.hidden_states[-1])", (SDXL,)),
    M("sdxl-empty-not-zero", "SDXL's ∅ encodes \"\" despite force_zeros_for_empty_prompt",
      "wadi_cli/diffusion/text.py", "            if self.zero_empty:", "            if False:", (SDXL,)),
    M("sdxl-time-ids-order", "SDXL time ids (W, H, ...) instead of (H, W, ...)",
      "wadi_cli/diffusion/denoisers.py",
      "row = torch.tensor([height, width, 0, 0, height, width]",
      "row = torch.tensor([width, height, 0, 0, height, width]", (SDXL,)),
    M("adam-betas-swapped", "AdamW betas (β2, β1)", "wadi_cli/distill/optimizers.py",
      "lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2)",
      "lr=lr, betas=(cfg.adam_beta2, cfg.adam_beta1)", (REF,)),
    M("warmup-off-by-one", "linear warm-up starts at 0", RECIPE,
      "return (step + 1) / w", "return step / w", (REF,)),
    M("student-timestep", "the one-step student evaluated at T−2", TRAINER,
      "pred = student(z, self.t_last, cond)", "pred = student(z, self.t_last - 1, cond)", (REF,)),
    # ---- losses --------------------------------------------------------------------------
    M("fake-loss-weight", "fake-score loss weighted by ᾱ² instead of ᾱ", LOSSES,
      "w = _bcast(alpha_bar_t, eps_pred).sqrt()", "w = _bcast(alpha_bar_t, eps_pred)",
      ("tests/distill/test_losses.py",)),
    M("vsd-weight", "VSD gradient weighted by ᾱ_t instead of 1 − ᾱ_t", LOSSES,
      "g = (1 - _bcast(alpha_bar_t, eps_real)) * (", "g = (_bcast(alpha_bar_t, eps_real)) * (",
      ("tests/distill/test_losses.py",)),
    M("cfg-formula", "guidance added to the conditional prediction", LOSSES,
      "return eps_uncond + scale * (eps_cond - eps_uncond)",
      "return eps_cond + scale * (eps_cond - eps_uncond)",
      ("tests/distill/test_losses.py",)),
    # ---- sampler formula, LoRaD, export, swap ----------------------------------------------
    M("sampler-x0-sign", "x0 = (z + sqrt(1−ᾱ)·ε)/sqrt(ᾱ)", "wadi_cli/diffusion/schedule.py",
      "return ((x_t.to(dt) - s * eps.to(dt)) / a).to(x_t.dtype)",
      "return ((x_t.to(dt) + s * eps.to(dt)) / a).to(x_t.dtype)", ("tests/diffusion/test_schedule.py",)),
    M("sampler-x0-divisor", "x0 = (z − sqrt(1−ᾱ)·ε)/sqrt(1−ᾱ)", "wadi_cli/diffusion/schedule.py",
      "return ((x_t.to(dt) - s * eps.to(dt)) / a).to(x_t.dtype)",
      "return ((x_t.to(dt) - s * eps.to(dt)) / s).to(x_t.dtype)", ("tests/diffusion/test_schedule.py",)),
    M("lorad-rotation-sign", "LoRaD rotates each pair by −θ", "wadi_cli/lorad/layer.py",
      "return torch.stack((cos * w0 - sin * w1, sin * w0 + cos * w1), dim=-1).reshape(m, n)",
      "return torch.stack((cos * w0 + sin * w1, -sin * w0 + cos * w1), dim=-1).reshape(m, n)",
      ("tests/lorad/test_layer.py",)),
    M("export-raw-not-ema", "export takes the raw student even when the run kept an EMA",
      "wadi_cli/distill/export.py", "if not (ema and file.is_file()):", "if True:",
      ("tests/distill/test_export.py::test_adapter_export_is_the_ema_by_default",)),
    M("onestep-scheduler-base-alpha", "the diffusers export keeps the schedule's ᾱ_999, not the recorded ᾱ_T",
      "wadi_cli/distill/export_diffusers.py", "out[-1] = 1.0 - alpha_bar_T / float(ac[-2])", "pass",
      ("tests/distill/test_export.py::test_diffusers_plain_one_step_call_is_wadi_sample",)),
    M("onestep-scheduler-leading", "the diffusers export's one step lands on t = 1 (leading spacing)",
      "wadi_cli/distill/export_diffusers.py", 'spacing": "trailing",', 'spacing": "leading",',
      ("tests/distill/test_export.py::test_diffusers_plain_one_step_call_is_wadi_sample",)),
    M("lora-kohya-scale", "kohya LoRA factors lose their sqrt(r) (effective ΔW_r / r)",
      "wadi_cli/distill/export_lora.py", "down * math.sqrt(r / KOHYA_ALPHA)", "down",
      ("tests/distill/test_export.py::test_lora_export_loads_in_diffusers_as_base_plus_truncated_change",)),
    M("lora-energy-off-by-one", "the energy rule keeps one singular value too few",
      "wadi_cli/distill/export_lora.py", "return min(max(r + 1, 1), len(s))", "return min(max(r, 1), len(s))",
      ("tests/distill/test_export.py::test_lora_of_planted_changes_covers_convs_and_the_energy_rule",)),
    M("finetune-prior-unweighted", "DreamBooth: the prior loss added without its weight λ",
      "wadi_cli/finetune/losses.py", "return instance + prior_weight * prior, instance, prior",
      "return instance + prior, instance, prior",
      ("tests/finetune/test_losses.py::test_dreambooth_loss_is_instance_plus_lambda_prior",)),
    M("finetune-v-target-sign", "DreamBooth: v target with the x0 term's sign flipped",
      "wadi_cli/finetune/losses.py", "(ab.sqrt() * eps.to(dt) - (1 - ab).sqrt() * x0.to(dt))",
      "(ab.sqrt() * eps.to(dt) + (1 - ab).sqrt() * x0.to(dt))",
      ("tests/finetune/test_losses.py::test_targets_of_each_prediction_type",)),
    M("invert-steer-all-positive", "ReVersion: the steering numerator sums every word",
      "wadi_cli/invert/losses.py",
      "return torch.logsumexp(logits, 0) - torch.logsumexp(logits[: len(positives)], 0)",
      "return torch.logsumexp(logits, 0) - torch.logsumexp(logits, 0)",
      ("tests/invert/test_losses.py::test_steering_loss_matches_a_float64_loop",)),
    M("invert-focal-sign", "ReVersion: importance sampling favours the clean end (1 + α·cos)",
      "wadi_cli/invert/losses.py", "f = (1.0 - alpha * torch.cos(math.pi * t / timesteps)) / timesteps",
      "f = (1.0 + alpha * torch.cos(math.pi * t / timesteps)) / timesteps",
      ("tests/invert/test_losses.py::test_relation_focal_probabilities_closed_form",)),
    M("invert-token-row-off-by-one", "a learned token reads the next row of its table",
      "wadi_cli/diffusion/tokens.py", "rows = table[(ids - vocab).clamp(min=0)]",
      "rows = table[(ids - vocab + 1).clamp(min=0, max=table.shape[0] - 1)]",
      ("tests/diffusion/test_tokens.py::test_two_learned_tokens_encode_as_diffusers_loads_them",)),
    M("merge-any-backbone", "merge no longer checks the adapter's backbone", "wadi_cli/lorad/adapter_io.py",
      "check_base_backbone(src, tensors, config, prefix)", "pass",
      ("tests/cli/test_info_merge.py::test_merge_refuses_an_adapter_of_another_backbone",)),
    M("swap-norm-interpolation", "--alpha interpolates the norms the wrong way round", SWAP,
      "g = (1.0 - alpha) * g_s + alpha * g_t", "g = alpha * g_s + (1.0 - alpha) * g_t",
      ("tests/swap/test_core.py",)),
    M("swap-keeps-student-directions", "--keep norm keeps the student's directions", SWAP,
      "d = d_t  # exactly the teacher's directions", "d = s / g_s.unsqueeze(1)",
      ("tests/swap/test_core.py",)),
    # ---- evaluation and IO (the tests that replaced same-path references) ---------------------
    M("eval-accuracy-any-attribute", "accuracy counts an image when ANY attribute matches",
      "wadi_cli/tiny/metrics.py", "all_ok = np.logical_and.reduce(list(match.values()))",
      "all_ok = np.logical_or.reduce(list(match.values()))",
      ("tests/cli/test_eval.py::test_eval_scores_planted_images",)),
    M("writability-probe-elsewhere", "the writability probe writes in the temp folder, not the destination",
      "wadi_cli/io/output_dirs.py", 'fd, probe = tempfile.mkstemp(prefix=".wadi-probe.", dir=probe_dir)',
      'fd, probe = tempfile.mkstemp(prefix=".wadi-probe.")',
      ("tests/io/test_writers.py::test_check_writable_folder_on_a_read_only_file_system",)),
    # ---- what the outputs say -------------------------------------------------------------------
    M("analyze-ratio-over-rounding", "wadi analyze prints a direction/norm ratio over unchanged norms",
      "wadi_cli/analysis/report.py",
      "return norm_rel_change_mean is not None and 0.0 <= norm_rel_change_mean < NORM_FLOOR", "return False",
      ("tests/cli/test_analyze.py::test_unchanged_norms_are_said_not_divided",)),
    M("demo-prompt-twice-in-grid", "the swap grid's rows repeat a prompt", "wadi_cli/demo/figures.py",
      "        seen.setdefault(p, i)", "        seen[f'{p}{i}'] = i",
      ("tests/demo/test_demo.py::test_grid_rows_show_each_prompt_once_and_colours_are_fixed_per_kind",)),
    # ---- the ablation kinds and sweeps ------------------------------------------------------------
    M("orthogonal-q-transposed", "orthogonal adapter applies W·Qᵀ, not W·Q", "wadi_cli/lorad/orthogonal.py",
      "rotated = x.to(q.dtype) @ q.T if x.dtype != torch.float64 else x @ q.T.to(x.dtype)",
      "rotated = x.to(q.dtype) @ q if x.dtype != torch.float64 else x @ q.to(x.dtype)",
      ("tests/lorad/test_orthogonal.py",)),
    M("dora-frozen-norm-trains-magnitude", "dora-frozen-norm trains (and saves) its magnitude",
      "wadi_cli/lorad/kinds.py", "layer.adapter_param_names = DORA_DIRECTION_PARAMS",
      'layer.adapter_param_names = (*DORA_DIRECTION_PARAMS, "lora_magnitude_vector.default.weight")',
      ("tests/lorad/test_orthogonal.py::test_dora_frozen_norm_keeps_its_magnitude_and_moves_directions",)),
    M("sweep-t-quantile", "sweep interval uses the one-sided quantile", "wadi_cli/sweep/stats.py",
      "half = t_quantile(0.5 + level / 2, n - 1) * math.sqrt(var / n)",
      "half = t_quantile(level, n - 1) * math.sqrt(var / n)", ("tests/sweep/test_stats.py",)),
    M("sweep-pairs-misaligned", "paired differences pair seed s with another seed", "wadi_cli/sweep/stats.py",
      "return t_interval([cell[s] - baseline[s] for s in seeds], level)",
      "return t_interval([cell[s] - baseline[seeds[-1 - i]] for i, s in enumerate(seeds)], level)",
      ("tests/sweep/test_stats.py",)),
    M("sweep-detectable-biased-sd", "the detectable difference uses the n-divided (biased) sd",
      "wadi_cli/sweep/stats.py", "sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (len(d) - 1))",
      "sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / len(d))", ("tests/sweep/test_stats.py",)),
    M("sweep-every-pair-reversed", "every pair's difference is minus − cell instead of cell − minus",
      "wadi_cli/sweep/report.py", '{"cell": b, "minus": a, **_pair(values[b], values[a])}',
      '{"cell": b, "minus": a, **_pair(values[a], values[b])}', ("tests/sweep/test_report.py",)),
    M("sweep-convergence-pairs-final-step", "convergence pairs every step with the baseline's final step",
      "wadi_cli/sweep/report.py", "row.update(_pair(mine, values.get(base.name, {}).get(step, {})))",
      "row.update(_pair(mine, list(values.get(base.name, {}).values())[-1]))",
      ("tests/sweep/test_report.py",)),
    M("sweep-reruns-finished-cells", "a resumed sweep runs finished cells again", "wadi_cli/sweep/runner.py",
      'if r.get("status") == "ok" and (not grid.analyze or r.get("dm", "") != "")', "if False",
      ("tests/sweep/test_runner.py",)),
    M("sweep-cell-major-order", "a sweep runs every seed of one cell before the next cell",
      "wadi_cli/sweep/runner.py",
      "pending = [(c, s) for s in grid.seeds for c in grid.cells if (c.name, s) not in done]",
      "pending = [(c, s) for c in grid.cells for s in grid.seeds if (c.name, s) not in done]",
      ("tests/sweep/test_runner.py::test_runs_go_seed_by_seed_so_a_stopped_sweep_has_balanced_arms",)),
    M("sweep-linked-baseline-partial", "a linked axis's baseline replaces only the named field",
      "wadi_cli/sweep/grid.py", "wanted.update(zip(names, match, strict=True))", "pass",
      ("tests/sweep/test_grid.py::test_a_linked_axis_sets_its_fields_together_and_the_baseline_takes_the_whole_value",)),
    # ---- downstream sampling: image-to-image, ControlNet ---------------------------------------
    M("img2img-alpha-bar-of-next-t", "one-step img2img uses ᾱ_{t+1}", "wadi_cli/pipeline/img2img.py",
      "ab = float(alpha_bar_at(ac, t))", "ab = float(alpha_bar_at(ac, t + 1))",
      ("tests/pipeline/test_img2img.py::test_one_step_img2img_matches_a_float64_reference",)),
    M("img2img-teacher-noised-one-t-early", "teacher noises the init to t−1", "wadi_cli/pipeline/teacher.py",
      "int(timesteps[0])))", "int(timesteps[0]) - 1))",
      ("tests/pipeline/test_img2img.py::test_teacher_img2img_matches_diffusers_img2img_pipeline",)),
    M("controlnet-scale-ignored", "the ControlNet runs at scale 1", "wadi_cli/pipeline/control.py",
      "conditioning_scale=self.scale,", "conditioning_scale=1.0,",
      ("tests/pipeline/test_control.py::test_one_step_with_controlnet_is_the_residual_injection_by_hand",)),
    M("silhouette-threshold", "a pixel is in the silhouette when fully covered", "wadi_cli/tiny/data.py",
      "cover >= 0.5", "cover >= 1.0",
      ("tests/tiny/test_data.py::test_silhouettes_are_the_shapes_drawn_in_the_same_images",)),
    M("segmentation-background-mean", "the background colour is the border's mean",
      "wadi_cli/tiny/metrics.py",
      "background = np.median(border, axis=1)", "background = np.mean(border, axis=1)",
      ("tests/tiny/test_metrics.py::test_shape_masks_recover_planted_shapes",)),
    M("iou-over-the-smaller", "IoU divides by the larger mask, not the union", "wadi_cli/tiny/metrics.py",
      "union = (p | t).sum(axis=(1, 2))", "union = np.maximum(p.sum(axis=(1, 2)), t.sum(axis=(1, 2)))",
      ("tests/tiny/test_metrics.py::test_mask_iou_of_planted_boxes",)),
    # ---- the memory model of the dry-run -----------------------------------------------------
    M("memory-freed-storage-not-subtracted", "LiveBytes never subtracts a dead storage", MEMORY,
      "self.now -= self._sizes.pop(key, 0)", "self._sizes.pop(key, 0)",
      ("tests/distill/test_memory.py::test_live_bytes_counts_storages_while_alive",)),
    M("memory-phases-summed", "the peak adds both step phases instead of the larger", MEMORY,
      "return self.static_bytes + max((self.phase_bytes(p, batch) for p in self.phases), default=0)",
      "return self.static_bytes + sum(self.phase_bytes(p, batch) for p in self.phases)",
      ("tests/distill/test_memory.py::test_prediction_arithmetic_on_planted_parts",)),
    M("memory-adam-one-moment", "AdamW state counted as one fp32 moment", MEMORY,
      '"adamw": 8,', '"adamw": 4,',
      ("tests/distill/test_memory.py::test_tiny_static_parts_from_the_loaded_networks",)),
)  # fmt: skip


def copy_tree(dest: Path) -> Path:
    """The package, the tests and pyproject.toml under ``dest`` (no .git, no venv)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("wadi_cli", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def environment(tree: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WADI_DEBUG", None)
    return env


def _test_id(classname: str, name: str) -> str:
    """``tests.pkg.test_x.TestY`` + ``test_z`` → ``pkg/test_x.py::TestY::test_z`` (path under tests/)."""
    parts = classname.split(".")
    i = next((j for j, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    start = parts.index("tests") + 1 if "tests" in parts[:i] else 0
    path = "/".join([*parts[start:i], f"{parts[i]}.py"])
    return "::".join([path, *parts[i + 1 :], name])


def run_tests(tree: Path, tests: tuple[str, ...], tag: str) -> tuple[int, list[str], float]:
    """Run ``tests`` in ``tree``; returns (pytest's exit code, failed test ids, seconds)."""
    report = tree / f".report-{tag}.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *tests,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=environment(tree), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    failed = []
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(_test_id(case.get("classname", ""), case.get("name", "")))
        report.unlink()
    if proc.returncode not in (0, 1):
        tail = (proc.stdout + proc.stderr)[-1500:]
        raise RuntimeError(f"{tag}: pytest exited {proc.returncode} (not a test failure):\n{tail}")
    return proc.returncode, failed, seconds


def apply(tree: Path, m: Mutation) -> str:
    """Mutate the copy; returns the original text (to restore)."""
    path = tree / m.file
    text = path.read_text(encoding="utf-8")
    count = text.count(m.old)
    if count != 1:
        raise RuntimeError(
            f"{m.name}: {m.file} holds {count} copies of {m.old!r} (expected 1): update the list"
        )
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")
    return text


def check_imports_copy(tree: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import wadi_cli; print(wadi_cli.__file__)"],
        cwd=tree,
        env=environment(tree),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the mutated copy is not what gets imported ({out})")


def worker(mutations: list[Mutation]) -> list[dict]:
    """Apply each mutation in turn to one private copy and run its tests."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="wadi-mutations-") as tmp:
        tree = copy_tree(Path(tmp))
        check_imports_copy(tree)
        for m in mutations:
            original = apply(tree, m)
            try:
                code, failed, seconds = run_tests(tree, m.tests, m.name)
            finally:
                (tree / m.file).write_text(original, encoding="utf-8")
            line = original[: original.index(m.old)].count("\n") + 1
            rows.append(
                {
                    "mutation": m,
                    "line": line,
                    "killed": code == 1 and bool(failed),
                    "failed": failed,
                    "s": seconds,
                }
            )
            status = "killed" if rows[-1]["killed"] else "SURVIVED"
            print(f"{status:8s} {m.name:32s} {seconds:6.1f} s  {', '.join(failed) or '-'}", flush=True)
    return rows


def write_table(path: Path, rows: list[dict], seconds: float, jobs: int) -> None:
    sys.path.insert(0, str(ROOT))
    from wadi_cli.machine import machine_info

    info = machine_info()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    killed = sum(r["killed"] for r in rows)
    lines = [
        "# Mutation check: every mutation is caught by a test",
        "",
        f"{when} · {info['cpu']} · {info['cores']} cores, {jobs} workers · torch {info['torch']} · "
        f"load {load:.1f} at the end (the machine is shared). `python tests/mutations.py --write {path}`",
        "",
        f"{killed} of {len(rows)} mutations killed, {len(rows) - killed} survived; {seconds:.0f} s wall. "
        "Each row: one line of the package changed, the tests run against it (in that order, "
        "stopping at the first failure), the test that failed.",
        "",
        "| mutation | what breaks | where | tests run | caught by | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["mutation"]
        run = "<br>".join(t.replace("tests/", "") for t in m.tests)
        caught = "<br>".join(r["failed"]) if r["killed"] else "**SURVIVED**"
        lines.append(f"| `{m.name}` | {m.what} | `{m.file}:{r['line']}` | {run} | {caught} | {r['s']:.0f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    parser.add_argument(
        "--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="parallel copies"
    )
    parser.add_argument("--skip-baseline", action="store_true", help="the unmutated tests passed already")
    parser.add_argument("--write", type=Path, help="write the result table (Markdown) here")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list or not selected:
        for m in MUTATIONS:
            found = (ROOT / m.file).read_text(encoding="utf-8").count(m.old)
            print(
                f"{m.name:32s} {m.file} ({found} match{'es' if found != 1 else ''})  ->  {', '.join(m.tests)}"
            )
        return 0 if args.list else 2
    start = time.perf_counter()
    if not args.skip_baseline:
        tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
        with tempfile.TemporaryDirectory(prefix="wadi-mutations-") as tmp:
            tree = copy_tree(Path(tmp))
            check_imports_copy(tree)
            code, failed, seconds = run_tests(tree, tests, "baseline")
        print(
            f"baseline: {len(tests)} selections {'pass' if code == 0 else 'FAIL'} in {seconds:.0f} s",
            flush=True,
        )
        if code != 0:
            print(f"the unmutated package fails {failed}: fix that first", file=sys.stderr)
            return 1
    # longest first (the quality test), spread round-robin over the workers
    order = sorted(selected, key=lambda m: QUALITY not in m.tests)
    chunks = [order[i :: args.jobs] for i in range(args.jobs)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = [row for rows in pool.map(worker, [c for c in chunks if c]) for row in rows]
    rank = {m.name: i for i, m in enumerate(MUTATIONS)}
    results.sort(key=lambda r: rank[r["mutation"].name])
    seconds = time.perf_counter() - start
    survived = [r["mutation"].name for r in results if not r["killed"]]
    print(f"{len(results) - len(survived)} of {len(results)} mutations killed in {seconds:.0f} s")
    if args.write:
        write_table(args.write, results, seconds, args.jobs)
    if survived:
        print(f"SURVIVED: {', '.join(survived)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
