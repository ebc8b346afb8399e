"""The swap library (wadi_cli.swap): row maths against planted ground truth and slow
per-row references, state-dict handling, files, and loading into the tiny pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.io import load_state_dict, save_safetensors
from wadi_cli.swap import slerp_rows, swap_rows, swap_state_dict, write_swap

TINY_UNET = "wadi_cli/assets/tiny/pipeline/unet"


def _unit_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    d = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def _planted(rows: int = 6, cols: int = 10, seed: int = 0):
    """Teacher and student rows with known norms and directions (float64)."""
    gen = torch.Generator().manual_seed(seed)
    g_t = torch.rand(rows, generator=gen, dtype=torch.float64) * 3 + 0.5
    g_s = torch.rand(rows, generator=gen, dtype=torch.float64) * 3 + 0.5
    d_t, d_s = _unit_rows(rows, cols, gen), _unit_rows(rows, cols, gen)
    return g_t, d_t, g_s, d_s


def _pair(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A small 'network': linear + conv weights, a bias, a norm and an embedding."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    teacher = {
        "down.proj.weight": r(8, 6),
        "down.proj.bias": r(8),
        "down.conv.weight": r(5, 3, 3, 3),
        "down.norm.weight": r(6),
        "token_embedding.weight": r(12, 6),
        "up.to_q.weight": r(4, 6),
    }
    student = {
        k: (v.float() + 0.5 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in teacher.items()
    }
    return teacher, student


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).double()


# ---- planted ground truth -------------------------------------------------------------------
def test_full_swap_gives_exact_teacher_norms_or_directions():
    g_t, d_t, g_s, d_s = _planted()
    teacher = {"l.weight": g_t[:, None] * d_t}
    student = {"l.weight": g_s[:, None] * d_s}
    norms, stats = swap_state_dict(teacher, student, "teacher_norms")
    w = norms["l.weight"]
    torch.testing.assert_close(w.norm(dim=1), g_t, rtol=1e-14, atol=0)
    torch.testing.assert_close(w / w.norm(dim=1, keepdim=True), d_s, rtol=0, atol=1e-14)
    assert (stats.tensors_swapped, stats.rows_swapped, stats.rows_skipped) == (1, 6, 0)
    dirs, stats = swap_state_dict(teacher, student, "teacher_directions")
    w = dirs["l.weight"]
    torch.testing.assert_close(w.norm(dim=1), g_s, rtol=1e-14, atol=0)
    torch.testing.assert_close(w / w.norm(dim=1, keepdim=True), d_t, rtol=0, atol=1e-14)
    assert stats.variant == "teacher_directions" and stats.keep == "norm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["teacher_norms", "teacher_directions"])
def test_alpha_zero_is_the_student_bit_for_bit(variant, dtype):
    teacher, student = _pair(dtype=dtype)
    hybrid, stats = swap_state_dict(teacher, student, variant, alpha=0.0)
    assert list(hybrid) == list(student)
    for k in student:
        assert hybrid[k].dtype == dtype and torch.equal(hybrid[k], student[k]), k
    assert stats.tensors_swapped == 3 and stats.tensors_swappable == 3


def _slerp_reference(u: list[float], v: list[float], a: float) -> list[float]:
    """Textbook slerp of two unit vectors, one row, plain Python."""
    dot = max(-1.0, min(1.0, sum(x * y for x, y in zip(u, v, strict=True))))
    th = math.acos(dot)
    if th == 0.0:
        return list(u)
    cu, cv = math.sin((1 - a) * th) / math.sin(th), math.sin(a * th) / math.sin(th)
    return [cu * x + cv * y for x, y in zip(u, v, strict=True)]


def _reference_rows(t: torch.Tensor, s: torch.Tensor, variant: str, a: float) -> torch.Tensor:
    """Slow per-row reference in plain Python floats (rows of the matrix view)."""
    out = []
    for trow, srow in zip(_rows(t).tolist(), _rows(s).tolist(), strict=True):
        gt = math.sqrt(sum(x * x for x in trow))
        gs = math.sqrt(sum(x * x for x in srow))
        ds, dt = [x / gs for x in srow], [x / gt for x in trow]
        if variant == "teacher_norms":
            g = (1 - a) * gs + a * gt
            out.append([g * x for x in ds])
        else:
            out.append([gs * x for x in _slerp_reference(ds, dt, a)])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("variant", ["teacher_norms", "teacher_directions"])
@pytest.mark.parametrize("alpha", [0.5, 0.25, 0.9])
def test_partial_swap_matches_slow_reference(variant, alpha):
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    student = teacher + 0.8 * torch.randn(7, 9, generator=gen, dtype=torch.float64)
    hybrid, counts = swap_rows(teacher, student, variant, alpha)
    torch.testing.assert_close(
        hybrid, _reference_rows(teacher, student, variant, alpha), rtol=1e-12, atol=1e-13
    )
    assert counts.swapped == 7


def test_conv_weights_swap_row_per_output_channel():
    gen = torch.Generator().manual_seed(4)
    teacher = torch.randn(6, 3, 2, 3, generator=gen, dtype=torch.float64)
    student = torch.randn(6, 3, 2, 3, generator=gen, dtype=torch.float64)
    for variant in ("teacher_norms", "teacher_directions"):
        hybrid, counts = swap_rows(teacher, student, variant, 0.5)
        assert hybrid.shape == student.shape and counts.swapped == 6
        ref = _reference_rows(teacher, student, variant, 0.5).reshape(student.shape)
        torch.testing.assert_close(hybrid, ref, rtol=1e-12, atol=1e-13)
    full, _ = swap_rows(teacher, student, "teacher_norms", 1.0)
    for o in range(6):  # output channel o: its flattened (in, kh, kw) block has the teacher's norm
        assert math.isclose(float(full[o].norm()), float(teacher[o].norm()), rel_tol=1e-13)


def test_slerp_extremes_identical_tiny_and_antipodal_rows():
    gen = torch.Generator().manual_seed(5)
    d_s = _unit_rows(3, 8, gen)
    same, anti, undef = slerp_rows(d_s, d_s.clone(), 0.5)
    torch.testing.assert_close(same, d_s, rtol=0, atol=1e-15)
    assert not anti.any() and not undef.any()
    # a tiny planted rotation by 1e-9 rad in the plane (e0, e1): alpha 0.5 turns by 5e-10
    e0 = torch.zeros(1, 4, dtype=torch.float64)
    e0[0, 0] = 1.0
    th = 1e-9
    d_t = torch.tensor([[math.cos(th), math.sin(th), 0.0, 0.0]], dtype=torch.float64)
    half, _, _ = slerp_rows(e0, d_t, 0.5)
    assert math.isclose(math.atan2(float(half[0, 1]), float(half[0, 0])), th / 2, rel_tol=1e-6)
    # exactly opposite rows: any great circle; the path stays on the sphere, at the right angle
    mid, anti, undef = slerp_rows(d_s, -d_s, 0.5)
    assert anti.all() and not undef.any()
    torch.testing.assert_close(mid.norm(dim=1), torch.ones(3, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close((mid * d_s).sum(1), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-14)


def test_antipodal_rows_in_swap():
    s = torch.tensor([[1.0, 2.0, 2.0], [3.0, 0.0, 4.0]], dtype=torch.float64)
    t = -2 * s  # opposite directions, doubled norms
    hybrid, counts = swap_rows(t, s, "teacher_directions", 0.5)
    assert counts.antipodal == 2 and counts.swapped == 2
    torch.testing.assert_close(hybrid.norm(dim=1), s.norm(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close((hybrid * s).sum(1), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-13)
    full, _ = swap_rows(t, s, "teacher_directions", 1.0)
    torch.testing.assert_close(full, -s, rtol=1e-15, atol=0)
    # single-column rows have no path between +1 and -1: left as the student's and counted
    col = torch.tensor([[2.0], [-1.0]])
    kept, counts = swap_rows(-col, col, "teacher_directions", 0.5)
    assert torch.equal(kept, col) and counts.undefined == 2 and counts.swapped == 0


def test_zero_and_nonfinite_rows_stay_the_students_and_are_counted():
    gen = torch.Generator().manual_seed(6)
    t = torch.randn(6, 4, generator=gen)
    s = torch.randn(6, 4, generator=gen)
    s[0] = 0.0  # zero student row
    t[1] = 0.0  # zero teacher row
    t[2, 1] = float("nan")
    s[3, 2] = float("inf")
    s[4, 0] = float("nan")
    for variant in ("teacher_norms", "teacher_directions"):
        hybrid, counts = swap_rows(t, s, variant, 1.0)
        assert (counts.zero, counts.nonfinite, counts.swapped) == (2, 3, 1)
        assert torch.equal(hybrid[:5], s[:5]) or torch.allclose(hybrid[:5], s[:5], equal_nan=True)
        assert hybrid[:5].view(torch.int32).equal(s[:5].view(torch.int32))  # bit for bit, NaN too
        assert not torch.equal(hybrid[5], s[5])
    _, stats = swap_state_dict({"a.weight": t}, {"a.weight": s}, "teacher_directions")
    assert (stats.rows_zero, stats.rows_nonfinite, stats.rows_skipped, stats.rows_swapped) == (2, 3, 5, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_preserved_and_values_are_the_float64_result_cast(dtype):
    teacher, student = _pair(seed=7, dtype=dtype)
    teacher = {k: v.float() for k, v in teacher.items()}  # teacher dtype may differ
    hybrid, _ = swap_state_dict(teacher, student, "teacher_directions", alpha=0.5)
    for k, v in hybrid.items():
        assert v.dtype == dtype, k
    w = "down.proj.weight"
    ref = _reference_rows(teacher[w], student[w], "teacher_directions", 0.5).to(dtype)
    torch.testing.assert_close(hybrid[w], ref, rtol=0, atol=float(ref.abs().max()) * 2**-9)


def test_other_tensors_are_untouched_and_every_student_key_is_kept():
    teacher, student = _pair()
    hybrid, stats = swap_state_dict(teacher, student, "teacher_norms")
    assert list(hybrid) == list(student) and stats.tensors == len(student)
    for k in ("down.proj.bias", "down.norm.weight", "token_embedding.weight"):
        assert hybrid[k] is student[k]
    for k in ("down.proj.weight", "down.conv.weight", "up.to_q.weight"):
        assert not torch.equal(hybrid[k], student[k])


def test_filter_limits_the_swap():
    teacher, student = _pair()
    hybrid, stats = swap_state_dict(teacher, student, "teacher_directions", filter=r"^down\.")
    assert stats.tensors_swapped == 2 and stats.filter == r"^down\."
    assert torch.equal(hybrid["up.to_q.weight"], student["up.to_q.weight"])
    assert not torch.equal(hybrid["down.conv.weight"], student["down.conv.weight"])
    with pytest.raises(BadInputError, match="matches none of the 3 swappable"):
        swap_state_dict(teacher, student, "teacher_directions", filter="bias")  # only a non-swappable tensor
    with pytest.raises(BadInputError, match="not a valid regular expression"):
        swap_state_dict(teacher, student, "teacher_directions", filter="(unclosed")


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "x"])
def test_bad_alpha_and_keep(alpha):
    teacher, student = _pair()
    with pytest.raises(BadInputError, match="--alpha"):
        swap_state_dict(teacher, student, "teacher_directions", alpha=alpha)
    with pytest.raises(BadInputError, match="--keep"):
        swap_state_dict(teacher, student, "norms")


def test_different_architectures_are_one_line_mismatch_errors():
    teacher, student = _pair()
    extra = {**teacher, "mid.extra.weight": torch.zeros(2, 2)}
    with pytest.raises(MismatchError, match=r"1 keys only in the teacher \(e\.g\. mid\.extra\.weight\)"):
        swap_state_dict(extra, student, "teacher_directions")
    wide = {**student, "down.proj.weight": torch.zeros(16, 6)}
    with pytest.raises(MismatchError) as exc:
        swap_state_dict(teacher, wide, "teacher_norms")
    msg = str(exc.value)
    assert "different architectures" in msg and "shape differs for down.proj.weight: (8, 6) vs (16, 6)" in msg
    assert "\n" not in msg
    adapter_like = {"x.lorad_A": torch.zeros(2, 1), "x.lorad_B": torch.zeros(1, 2)}
    with pytest.raises(MismatchError, match="wadi merge"):
        swap_state_dict(teacher, adapter_like, "teacher_directions")


# ---- files ------------------------------------------------------------------------------------
def test_write_swap_round_trip_metadata_and_refusals(tmp_path):
    teacher, student = _pair(seed=8)
    tp, sp, out = tmp_path / "t.safetensors", tmp_path / "s.safetensors", tmp_path / "h.safetensors"
    save_safetensors(teacher, tp)
    save_safetensors(student, sp)
    stats = write_swap(tp, sp, "teacher_norms", out, alpha=0.5, filter="proj|conv")
    expected, _ = swap_state_dict(teacher, student, "teacher_norms", alpha=0.5, filter="proj|conv")
    written = load_state_dict(out)
    assert set(written) == set(expected)  # safetensors stores names sorted
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert stats.tensors_swapped == 2
    with safe_open(str(out), "pt") as fh:
        recipe = json.loads(fh.metadata()["wadi_config"])
    assert (recipe["keep"], recipe["alpha"], recipe["filter"], recipe["variant"]) == (
        "direction",
        0.5,
        "proj|conv",
        "teacher_norms",
    )
    assert recipe["teacher"] == str(tp) and recipe["student"] == str(sp) and recipe["tensors_swapped"] == 2
    with pytest.raises(BadInputError, match="already exists"):
        write_swap(tp, sp, "teacher_directions", out)
    with pytest.raises(BadInputError, match="differ from STUDENT"):
        write_swap(tp, sp, "teacher_directions", sp, overwrite=True)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BadInputError, match="cannot be created"):
        write_swap(tp, sp, "teacher_directions", blocker / "out.safetensors")
    mismatched = tmp_path / "m.safetensors"
    save_safetensors({**student, "extra.weight": torch.zeros(2, 2)}, mismatched)
    with pytest.raises(MismatchError):
        write_swap(tp, mismatched, "teacher_directions", tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "file",
        "h.safetensors",
        "m.safetensors",
        "s.safetensors",
        "t.safetensors",
    ]


def test_lorad_adapter_student_is_merged_into_the_teacher(tmp_path):
    """A LoRaD student only rotates rows, so teacher norms change nothing (teacher_norms
    gives the student back) and teacher directions give the teacher back."""
    from wadi_cli.lorad import LoRaDConfig, merge_adapter_into_state_dict, save_adapter

    gen = torch.Generator().manual_seed(9)
    teacher = {
        "blk.lin.weight": torch.randn(6, 8, generator=gen),
        "blk.lin.bias": torch.randn(6, generator=gen),
    }
    adapter = {
        "blk.lin.lorad_A": 0.3 * torch.randn(6, 2, generator=gen),
        "blk.lin.lorad_B": torch.randn(2, 4, generator=gen),
    }
    tp, ap = tmp_path / "t.safetensors", tmp_path / "adapter.safetensors"
    save_safetensors(teacher, tp)
    save_adapter(ap, adapter, LoRaDConfig(rank=2))
    student = merge_adapter_into_state_dict(teacher, adapter)
    assert not torch.allclose(student["blk.lin.weight"], teacher["blk.lin.weight"], atol=1e-3)
    write_swap(tp, ap, "teacher_norms", tmp_path / "norms.safetensors")
    write_swap(tp, ap, "teacher_directions", tmp_path / "dirs.safetensors")
    norms = load_state_dict(tmp_path / "norms.safetensors")
    dirs = load_state_dict(tmp_path / "dirs.safetensors")
    torch.testing.assert_close(norms["blk.lin.weight"], student["blk.lin.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dirs["blk.lin.weight"], teacher["blk.lin.weight"], rtol=1e-5, atol=1e-6)


def test_tiny_hybrid_loads_strictly_into_the_tiny_pipeline(tmp_path, one_thread):
    from wadi_cli.pipeline import load_pipeline

    teacher = load_state_dict(TINY_UNET)
    gen = torch.Generator().manual_seed(10)
    student = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.dim() >= 2 else v for k, v in teacher.items()
    }
    sp, out = tmp_path / "student.safetensors", tmp_path / "hybrid.safetensors"
    save_safetensors(student, sp)
    stats = write_swap(TINY_UNET, sp, "teacher_directions", out)
    assert stats.tensors == len(teacher) and stats.tensors_swapped == 119 and stats.rows_skipped == 0
    sampler = load_pipeline("tiny", weights=out)
    assert sampler.weights_kind == "merged"
    loaded = sampler.denoiser.model.state_dict()
    written = load_state_dict(out)
    assert set(loaded) == set(written)
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    w = "down_blocks.0.attentions.0.proj_in.weight"
    d = loaded[w].double() / loaded[w].double().norm(dim=1, keepdim=True)
    d_t = teacher[w].double() / teacher[w].double().norm(dim=1, keepdim=True)
    torch.testing.assert_close(d, d_t, rtol=0, atol=1e-6)  # teacher directions, fp32 cast
    torch.testing.assert_close(loaded[w].norm(dim=1), student[w].norm(dim=1), rtol=1e-6, atol=0)


def test_evaluate_swap_variants_agrees_with_wadi_eval(tmp_path, one_thread):
    """In-process scores of the four variants == `wadi eval`'s (evaluate_tiny) on files."""
    from wadi_cli.evaluation.tiny import evaluate_tiny
    from wadi_cli.swap import evaluate_swap_variants

    teacher = load_state_dict(TINY_UNET)
    gen = torch.Generator().manual_seed(11)
    student = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.dim() >= 2 else v for k, v in teacher.items()
    }
    sp, hp = tmp_path / "student.safetensors", tmp_path / "dirs.safetensors"
    save_safetensors(student, sp)
    write_swap(TINY_UNET, sp, "teacher_directions", hp)
    res = evaluate_swap_variants(teacher, student, num_images=8, seed=3, teacher_steps=2, cfg=2.0)
    assert list(res) == ["teacher", "student", "teacher_norms", "teacher_directions"]
    assert res["teacher"]["steps"] == 2 and res["teacher"]["cfg"] == 2.0 and res["student"]["steps"] == 1
    for name, kwargs in (
        ("teacher", {"teacher": True, "steps": 2, "cfg": 2.0}),
        ("student", {"weights": sp}),
        ("teacher_directions", {"weights": hp}),
    ):
        ref, _ = evaluate_tiny(num_images=8, seed=3, **kwargs)
        assert (res[name]["accuracy"], res[name]["fd"]) == (ref["accuracy"], ref["fd"]), name
    assert 0.0 <= res["teacher_norms"]["accuracy"] <= 1.0 and math.isfinite(res["teacher_norms"]["fd"])
    with pytest.raises(BadInputError, match="tiny backbone only"):
        evaluate_swap_variants(teacher, student, backbone="sd15")


def test_swap_sample_checks_the_base_files_that_sampling_loads(tmp_path, monkeypatch):
    """``--sample`` checks the base pipeline before any tensor is read, fetching what the
    sampling will load: the fp16 files when it samples in fp16 (on CUDA), not the fp32
    set as well."""
    from wadi_cli.pipeline.options import SamplingOptions
    from wadi_cli.swap import compare

    seen = []
    monkeypatch.setattr(compare, "resolve_pipeline_source", lambda spec, model, **kw: seen.append(kw))
    options = SamplingOptions(backbone="sd15", teacher=True, seed=0, num_images=2, device="cpu")
    sampling = compare.SwapSampling(
        prompts=["a cat"], out=tmp_path / "grids", options=options, rows=1, evaluate=False
    )
    sampling.check(torch.float16)
    sampling.check()  # on the CPU wadi samples in fp32
    assert seen == [{"variant": "fp16"}, {"variant": None}]
