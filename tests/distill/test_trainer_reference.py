"""The WaDi training step (method §4) against an independent, slow, float64 re-statement.

:class:`ReferenceWaDi` below shares no maths with the package. It builds three SEPARATE
networks from the plain tiny U-Net (teacher; student and fake score each with their own
LoRaD, written with complex numbers: the column pair ``(w_2k, w_2k+1)`` is the number
``w_2k + i·w_2k+1`` and a rotation by θ is a product with ``e^{iθ}``), computes ᾱ from the
scheduler's config, draws the step's random numbers in the order the Distiller documents
(one generator: z, t, ε, t_fake, ε_fake, dropout, then the regression indices), and writes
out the rest: the one-step x0, classifier-free guidance, the VSD gradient as a
vector-Jacobian product (not the surrogate loss), the regression term, the fake-score
loss, gradient accumulation, clipping, AdamW, the EMA and extra fake updates on fresh
student samples.

What the reference takes from the package: the prompt order (``PromptStream``, tested in
distill/test_data), the text encoder's output, the adapters' initial values and the
regression pairs (teacher samples, tested against diffusers' pipeline in
pipeline/test_generation / distill/test_trainer). The settings are asymmetric on purpose
(EMA 0.9, regression weight 0.3, guidance 3 vs 1.5, betas 0.8/0.95, a warm-up, clipping on
for the student and off for the fake score) so that swapped arguments cannot agree.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _helpers_sample import tiny_module, tiny_pipeline_dir
from torch import nn

from wadi_cli.distill import resolve_config
from wadi_cli.distill.trainer import Distiller
from wadi_cli.lorad.multi_adapter import adapter_state_dict

PROMPTS = [
    "a red circle at the top left",
    "a blue square at the top right",
    "a green triangle at the bottom left",
]

#: The settings of the comparison (see the module docstring for why each is asymmetric).
SETTINGS = dict(
    batch_size=2,
    grad_accum=2,
    fake_updates=2,
    ema_decay=0.9,
    regression_weight=0.3,
    regression_pairs=5,
    regression_steps=2,
    guidance=3.0,
    fake_guidance=1.5,
    prompt_dropout=0.5,
    lr=1e-2,
    fake_lr=3e-3,
    adam_beta1=0.8,
    adam_beta2=0.95,
    weight_decay=0.01,
    warmup_steps=2,
    max_grad_norm=0.4,  # the student's gradient norm: 0.24 at step 1 (not clipped), 0.66 at step 2 (clipped)
    fake_max_grad_norm=10.0,  # the fake score's: 2e-4 to 0.08, never clipped
    text_cache=16,
    seed=1,
    device="cpu",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped_pipeline():
    """The trained tiny pipeline (nothing to build)."""
    from wadi_cli.backbones.registry import TINY_PIPELINE_DIR

    if not (TINY_PIPELINE_DIR / "unet").is_dir():
        pytest.skip("the trained tiny pipeline is not shipped in this install")
    return TINY_PIPELINE_DIR


@pytest.fixture(scope="module")
def random_pipeline():
    """A randomly initialised tiny pipeline (see the mixed-precision test for why)."""
    tiny_module()
    return tiny_pipeline_dir()


# ---- the reference ------------------------------------------------------------------------
class ComplexLoRaD(nn.Module):
    """A Linear whose weight rows are rotated pair-wise by Θ = A B (float64): each pair
    ``(w_2k, w_2k+1)`` is the complex number ``w_2k + i w_2k+1``, multiplied by ``e^{iΘ}``."""

    def __init__(self, linear: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.weight = linear.weight.detach().double()
        self.bias = None if linear.bias is None else linear.bias.detach().double()
        self.A = nn.Parameter(A.detach().double().clone())
        self.B = nn.Parameter(B.detach().double().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, n = self.weight.shape
        theta = self.A @ self.B
        pairs = torch.view_as_complex(self.weight.reshape(m, n // 2, 2).contiguous())
        rotated = pairs * torch.complex(torch.cos(theta), torch.sin(theta))
        return F.linear(x, torch.view_as_real(rotated).reshape(m, n), self.bias)


def _with_lorad(plain: nn.Module, init: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A float64 copy of ``plain`` with a :class:`ComplexLoRaD` on every Linear named in
    ``init`` (``<path>.lorad_A/B``); returns it and its trainable tensors by those names."""
    net = copy.deepcopy(plain).double().requires_grad_(False)
    params: dict[str, nn.Parameter] = {}
    for path in sorted({k.rsplit(".", 1)[0] for k in init}):
        parent, _, child = path.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        layer = ComplexLoRaD(getattr(owner, child), init[f"{path}.lorad_A"], init[f"{path}.lorad_B"])
        setattr(owner, child, layer)
        params[f"{path}.lorad_A"], params[f"{path}.lorad_B"] = layer.A, layer.B
    return net, params


class ReferenceWaDi:
    """WaDi §4, one step at a time, written out in float64 with three separate networks."""

    def __init__(self, cfg, plain: nn.Module, encoder, stream, scheduler_config, student0, fake0, pairs):
        self.cfg = cfg
        self.teacher = copy.deepcopy(plain).double().requires_grad_(False)
        self.student, self.ps = _with_lorad(plain, student0)
        self.fake, self.pf = _with_lorad(plain, fake0)
        self.encoder, self.stream = encoder, stream
        sc = scheduler_config
        assert sc["beta_schedule"] == "scaled_linear"
        # SD's scaled-linear table, in float32 as diffusers defines it (float64 moves ᾱ by ~1e-6)
        lin = torch.linspace(
            sc["beta_start"] ** 0.5, sc["beta_end"] ** 0.5, sc["num_train_timesteps"], dtype=torch.float32
        )
        self.abar = torch.cumprod(1 - lin**2, 0).double()
        self.T = sc["num_train_timesteps"]
        self.pairs = (
            {k: (v.double() if torch.is_tensor(v) else v) for k, v in pairs.items()} if pairs else None
        )
        self.ema = {k: p.detach().clone() for k, p in self.ps.items()}
        self.adam = {
            role: {k: [torch.zeros_like(p), torch.zeros_like(p)] for k, p in params.items()}
            for role, params in (("student", self.ps), ("fake", self.pf))
        }
        self.adam_t = {"student": 0, "fake": 0}
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.log: dict[str, Any] = {"clipped": [], "dropped": 0, "grads": []}

    # pieces
    def emb(self, prompts: list[str]) -> torch.Tensor:
        return torch.cat([self.encoder([p]).embeds for p in prompts]).double()

    def eps(self, net: nn.Module, x: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else t
        return net(x, t, encoder_hidden_states=emb).sample

    def cfg_eps(self, net: nn.Module, x, t, emb, w: float) -> torch.Tensor:
        e_c = self.eps(net, x, t, emb)
        if w == 1.0:
            return e_c
        e_u = self.eps(net, x, t, self.emb([""] * len(x)))
        return e_u + w * (e_c - e_u)

    def x0_of(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x0 = (z − sqrt(1 − ᾱ_T) ε̂(z, T−1)) / sqrt(ᾱ_T)."""
        a = self.cfg.alpha_bar_T
        return (z - math.sqrt(1 - a) * self.eps(self.student, z, self.T - 1, emb)) / math.sqrt(a)

    def draws(self) -> list[dict]:
        cfg, g = self.cfg, self.gen
        b, k = cfg.batch_size, cfg.grad_accum
        shape = (k * b, 4, 8, 8)
        z = torch.randn(shape, generator=g)
        t = torch.randint(cfg.t_min, cfg.t_max + 1, (k * b,), generator=g)
        eps = torch.randn(shape, generator=g)
        t_f = torch.randint(cfg.fake_t_min, cfg.fake_t_max + 1, (k * b,), generator=g)
        eps_f = torch.randn(shape, generator=g)
        drop = torch.rand(k * b, generator=g) < cfg.prompt_dropout
        prompts = self.stream.next_batch(k * b)
        return [
            {
                "z": z[s].double(),
                "t": t[s],
                "eps": eps[s].double(),
                "t_f": t_f[s],
                "eps_f": eps_f[s].double(),
                "drop": drop[s],
                "prompts": prompts[s],
            }
            for s in (slice(m * b, (m + 1) * b) for m in range(k))
        ]

    def adamw(self, role: str, params: dict[str, nn.Parameter], grads: dict[str, torch.Tensor], lr: float):
        cfg = self.cfg
        b1, b2 = cfg.adam_beta1, cfg.adam_beta2
        self.adam_t[role] += 1
        n = self.adam_t[role]
        with torch.no_grad():
            for key, p in params.items():
                m, v = self.adam[role][key]
                m.mul_(b1).add_((1 - b1) * grads[key])
                v.mul_(b2).add_((1 - b2) * grads[key] ** 2)
                m_hat, v_hat = m / (1 - b1**n), v / (1 - b2**n)
                p.mul_(1 - lr * cfg.weight_decay)
                p.sub_(lr * m_hat / (v_hat.sqrt() + cfg.adam_eps))

    def clip(self, grads: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        coef = min(1.0, max_norm / (norm + 1e-6))
        self.log["clipped"].append(coef < 1.0)
        clipped = {k: g * coef for k, g in grads.items()}
        self.log["grads"].append(clipped)
        return clipped

    def fake_grads(self, samples: list[tuple[torch.Tensor, dict]]) -> dict[str, torch.Tensor]:
        """Σ over micro-batches of ∇ mean(ᾱ_t (ε_fake(x_t, t, c or ∅) − ε)²) / k."""
        k = self.cfg.grad_accum
        total = {key: torch.zeros_like(p) for key, p in self.pf.items()}
        for x0, d in samples:
            ab = self.abar[d["t_f"]].reshape(-1, 1, 1, 1)
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * d["eps_f"]
            prompts = ["" if drop else p for p, drop in zip(d["prompts"], d["drop"].tolist(), strict=True)]
            self.log["dropped"] += int(d["drop"].sum())
            loss = (ab * (self.eps(self.fake, x_t, d["t_f"], self.emb(prompts)) - d["eps_f"]) ** 2).mean()
            grads = torch.autograd.grad(loss, list(self.pf.values()))
            for key, g in zip(self.pf, grads, strict=True):
                total[key] += g / k
        return total

    # the step
    def step(self) -> None:
        cfg = self.cfg
        k = cfg.grad_accum
        scale = min(1.0, (self.step_count + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        grads = {key: torch.zeros_like(p) for key, p in self.ps.items()}
        samples = []
        for d in self.draws():
            n_pairs = len(self.pairs["prompts"]) if self.pairs else 0
            idx = torch.randint(0, n_pairs, (cfg.batch_size,), generator=self.gen) if self.pairs else None
            emb = self.emb(d["prompts"])
            x0 = self.x0_of(d["z"], emb)
            ab = self.abar[d["t"]].reshape(-1, 1, 1, 1)
            with torch.no_grad():
                x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * d["eps"]
                real = self.cfg_eps(self.teacher, x_t, d["t"], emb, cfg.guidance)
                fake = self.cfg_eps(self.fake, x_t, d["t"], emb, cfg.fake_guidance)
                g = (1 - ab) * (real - fake)
            # the generator's gradient w.r.t. x0 is g / numel (a vector-Jacobian product) ...
            vjp = torch.autograd.grad(x0, list(self.ps.values()), grad_outputs=g / x0.numel())
            for key, gr in zip(self.ps, vjp, strict=True):
                grads[key] += gr / k
            if self.pairs:  # ... plus the regression term w · mean((G(z_j) − x0_j)²)
                x0_r = self.x0_of(self.pairs["z"][idx], self.emb([self.pairs["prompts"][i] for i in idx]))
                reg = cfg.regression_weight * ((x0_r - self.pairs["x0"][idx]) ** 2).mean()
                for key, gr in zip(self.ps, torch.autograd.grad(reg, list(self.ps.values())), strict=True):
                    grads[key] += gr / k
            samples.append((x0.detach(), d))
        self.adamw("student", self.ps, self.clip(grads, cfg.max_grad_norm), cfg.lr * scale)
        with torch.no_grad():
            for key, p in self.ps.items():  # EMA: decay · ema + (1 − decay) · new
                self.ema[key] = cfg.ema_decay * self.ema[key] + (1 - cfg.ema_decay) * p
        for j in range(cfg.fake_updates):
            if j > 0:  # fresh samples of the updated student
                with torch.no_grad():
                    samples = [(self.x0_of(d["z"], self.emb(d["prompts"])), d) for d in self.draws()]
            fg = self.clip(self.fake_grads(samples), cfg.fake_max_grad_norm)
            self.adamw("fake", self.pf, fg, cfg.fake_lr * scale)
        self.step_count += 1


# ---- set-up and comparison ------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Within the block, new tensors (the Distiller's random draws) default to ``dtype``."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _setup(pipe_dir, dtype: torch.dtype, **overrides) -> tuple[Distiller, ReferenceWaDi, list]:
    """A Distiller whose frozen base is stored in ``dtype`` (float64: its adapters and
    optimizer state too), the reference started from the same state, and the list that
    collects the gradients the Distiller hands to its optimizers (role, {name: grad})."""
    from wadi_cli.pipeline import load_pipeline

    cfg = resolve_config(overrides={**SETTINGS, "model": str(pipe_dir), **overrides})
    ref_sampler = load_pipeline("tiny", model=pipe_dir, teacher=True, dtype=torch.float64)
    plain = copy.deepcopy(ref_sampler.denoiser.model)
    sampler = load_pipeline("tiny", model=pipe_dir, teacher=True, dtype=dtype)
    d = Distiller(cfg, sampler, PROMPTS)
    if dtype == torch.float64:
        for params in d.params.values():
            for p in params:
                p.data = p.data.double()  # before the first step: Adam's state follows
        d.ema.to(dtype=torch.float64)
    ref = ReferenceWaDi(
        cfg,
        plain,
        ref_sampler.prompt_encoder,
        copy.deepcopy(d.stream),
        dict(sampler.scheduler.config),
        adapter_state_dict(d.net, "student"),
        adapter_state_dict(d.net, "fake"),
        d.pairs,
    )
    seen: list = []
    for role in ("student", "fake"):
        names = list(adapter_state_dict(d.net, role))  # the order of d.params[role]

        def grab(opt, args, kwargs, role=role, names=names):  # after unscaling and clipping
            seen.append(
                (role, {n: p.grad.double().clone() for n, p in zip(names, d.params[role], strict=True)})
            )

        d.optimizers[role].register_step_pre_hook(grab)
    return d, ref, seen


def _state(d: Distiller) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "student": {k: v.double() for k, v in adapter_state_dict(d.net, "student").items()},
        "fake": {k: v.double() for k, v in adapter_state_dict(d.net, "fake").items()},
        "ema": {k: v.double() for k, v in d.ema.shadow.items()},
    }


def _ref_state(ref: ReferenceWaDi) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "student": {k: p.detach().clone() for k, p in ref.ps.items()},
        "fake": {k: p.detach().clone() for k, p in ref.pf.items()},
        "ema": {k: v.clone() for k, v in ref.ema.items()},
    }


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all tensors of a role."""
    num = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in b))
    return num / math.sqrt(sum(float((v**2).sum()) for v in b.values()))


def _minus(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] - b[k] for k in b}


def _gradient_errors(seen: list, ref: ReferenceWaDi) -> list[float]:
    """Relative error of every gradient handed to an optimizer (student, fake, fake, ...)."""
    assert [r for r, _ in seen] == ["student", *["fake"] * SETTINGS["fake_updates"]] * (len(seen) // 3)
    assert len(seen) == len(ref.log["grads"]) > 0
    return [_rel(got, want) for (_, got), want in zip(seen, ref.log["grads"], strict=True)]


def test_two_steps_match_the_float64_reference_update_for_update(shipped_pipeline):
    """Everything float64 (base, adapters, Adam state and, through the default dtype, the
    run's draws): the gradients handed to both optimizers, every student and fake-score
    tensor and the EMA agree with the reference after each of two steps, to 1e-9 of each
    update with Adam's ε = 1e-8 as in the paper (a float64 run agrees to ~1e-13). The EMA
    is kept in float32 by design: 1e-5 of its update (the run: ~7e-7)."""
    with default_dtype(torch.float64):
        d, ref, seen = _setup(shipped_pipeline, torch.float64)
        start = _ref_state(ref)
        for step in range(2):
            d.train_step()
            ref.step()
            got, want = _state(d), _ref_state(ref)
            for role in ("student", "fake", "ema"):
                err = _rel(_minus(got[role], start[role]), _minus(want[role], start[role]))
                assert err < (1e-5 if role == "ema" else 1e-9), (step, role, err)
    assert max(_gradient_errors(seen, ref)) < 1e-9
    # not vacuous: prompts were dropped, the student clipped at step 2 and not at step 1,
    # the fake score never, and every role moved
    assert ref.log["dropped"] > 0 and ref.log["clipped"] == [False, False, False, True, False, False]
    moved = {role: _rel(_ref_state(ref)[role], start[role]) for role in ("student", "fake", "ema")}
    assert all(v > 1e-4 for v in moved.values()), moved


#: Unit roundoff of each storage dtype of the frozen base.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize(
    ("dtype", "multiple"),
    [(torch.float32, 64), (torch.bfloat16, 16), (torch.float16, 16)],
    ids=["fp32", "bf16", "fp16"],
)
def test_mixed_precision_gradients_match_the_reference_within_rounding(random_pipeline, dtype, multiple):
    """The shipped precision paths (draws in float32; the frozen base stored in fp32, bf16,
    or fp16 with a GradScaler; adapters in fp32): the gradient handed to each optimizer
    (unscaled, accumulated over 2 micro-batches, clipped) against the float64 reference.

    Tolerance from the dtype: the base's weights and activations carry relative rounding
    errors of the unit roundoff u (bf16 2^-8, fp16 2^-11), and the measured gradient error
    is 2.3–6.9 u for BOTH half dtypes (fp32: 8–29 u, where the float32 draws, text encoder
    and adapter maths add their own roundings); 16 u (64 u for fp32) leaves a margin of
    more than 2. A wrongly scaled (GradScaler, accumulation), unclipped or reversed
    gradient is off by O(1). Adam normalises the step size, so updates would hide a wrong
    scale: the gradients are compared, the update rule itself by the float64 test.

    The base is a RANDOM tiny network: it does not predict the noise, so the one-step
    x0 = (z − sqrt(1 − ᾱ_T) ε̂) / sqrt(ᾱ_T) does not cancel. The trained network's ε̂ ≈ z
    at T − 1 makes it cancel and multiplies the rounding by up to 1/sqrt(ᾱ_T) ≈ 15
    (measured there: fp16 12–14 u, bf16 11–40 u), a property of the model, not of the code
    path this test guards."""
    d, ref, seen = _setup(random_pipeline, dtype)
    d.train_step()
    ref.step()
    errors = _gradient_errors(seen, ref)
    u = UNIT_ROUNDOFF[dtype]
    assert max(errors) < multiple * u, [f"{e / u:.1f} u" for e in errors]
    scaler = d.scalers["student"]
    assert scaler.is_enabled() == (dtype == torch.float16)
    if scaler.is_enabled():  # the GradScaler path ran and skipped no step
        assert scaler.get_scale() == d.scalers["fake"].get_scale() == 65536.0
