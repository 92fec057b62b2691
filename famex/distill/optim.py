"""Optimizer and learning-rate schedules for distillation and QAD.

- `AdEMAMix` (Pagliardini, Ablin, Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
  ICLR 2025, Algorithm 1): Adam whose numerator mixes a fast EMA of gradients with a slow one,
  with the paper's warm-ups of α (linear) and β3 (linear in the slow EMA's half-life).
- `wsd_schedule` (warm-up, stable, decay) for pre-training distillation and `cosine_schedule`
  for QAD (AdamW + cosine), as pure functions of the step returning a multiplier of the peak LR,
  plus `lr_lambda` to hand either to `torch.optim.lr_scheduler.LambdaLR`.

What this module does not do: choose per-preset learning rates, batch sizes or iteration counts
(they live with the presets in `famex.models.presets`), clip gradients, or step schedulers.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch

from famex.errors import FamexError

# ----------------------------------------------------------------------------------------------
# AdEMAMix


def ademamix_alpha(step: int, alpha: float, warmup: int | None) -> float:
    """α at step t (1-based): the paper's f_α(t) = min(t·α / T_α, α); α itself without warm-up."""
    if not warmup:
        return alpha
    return min(step * alpha / warmup, alpha)


def ademamix_beta3(step: int, beta3: float, beta_start: float, warmup: int | None) -> float:
    """β3 at step t (1-based), the paper's f_β3:

        f_β3(t) = min( exp( ln(β_start)·ln(β3) / ((1 − t/T)·ln(β3) + (t/T)·ln(β_start)) ), β3 )

    It moves the slow EMA's half-life ln(0.5)/ln(β) linearly from β_start's (the paper uses
    β_start = β1) to β3's over T steps; a linear ramp of β3 itself would spend almost all of
    the warm-up at short half-lives. β3 itself without warm-up.
    """
    if not warmup or step >= warmup:
        return beta3
    a = step / warmup
    lb, l3 = math.log(beta_start), math.log(beta3)
    return min(math.exp(lb * l3 / ((1.0 - a) * l3 + a * lb)), beta3)


class AdEMAMix(torch.optim.Optimizer):
    """AdEMAMix, Algorithm 1 of Pagliardini et al. (ICLR 2025). Per parameter θ with gradient g,
    at step t (1-based):

        α_t, β3_t  = ademamix_alpha(t, α, T_α), ademamix_beta3(t, β3, β1, T_β3)
        m1 ← β1·m1 + (1 − β1)·g                  fast EMA, bias-corrected: m̂1 = m1 / (1 − β1^t)
        m2 ← β3_t·m2 + (1 − β3_t)·g              slow EMA, *not* bias-corrected
        ν  ← β2·ν + (1 − β2)·g²                  second moment: ν̂ = ν / (1 − β2^t)
        θ  ← θ − lr·( (m̂1 + α_t·m2) / (√ν̂ + ε) + λ·θ )     decoupled weight decay λ

    Args:
        lr: peak learning rate (schedules scale `param_group["lr"]`).
        betas: (β1, β2, β3); the paper's (0.9, 0.999, 0.9999).
        alpha: mixing weight of the slow EMA; the paper sweeps 4–10 and uses 8 for its
            language models (also the authors' reference example).
        t_alpha, t_beta3: warm-up lengths in steps of α and β3 (the paper sets both to the
            total number of iterations); None: no warm-up (unstable from scratch with large β3).
        eps: ε added to √ν̂.
        weight_decay: λ, applied as lr·λ·θ (AdamW-style, decoupled); 0.1 in the authors' example.

    State per parameter: `step` (int64 tensor), `exp_avg_fast` (m1), `exp_avg_slow` (m2),
    `exp_avg_sq` (ν), all in the parameter's dtype; `state_dict()` / `load_state_dict()` round-trip
    exactly, so a resumed run continues bit-for-bit. With α = 0 this is exactly AdamW.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 8.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
    ):
        if not lr >= 0.0:
            raise FamexError(f"AdEMAMix: learning rate must be ≥ 0, got {lr}")
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise FamexError(f"AdEMAMix: betas must be three values in [0, 1) (β1, β2, β3), got {betas}")
        if not alpha >= 0.0:
            raise FamexError(f"AdEMAMix: alpha must be ≥ 0, got {alpha}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise FamexError(f"AdEMAMix: eps and weight_decay must be ≥ 0, got {eps}, {weight_decay}")
        for name, t in (("t_alpha", t_alpha), ("t_beta3", t_beta3)):
            if t is not None and t < 0:
                raise FamexError(f"AdEMAMix: {name} must be ≥ 0 steps or None, got {t}")
        if t_beta3 and betas[0] == 0.0:
            raise FamexError("AdEMAMix: the β3 warm-up starts from β1, so β1 must be > 0 when t_beta3 is set")
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
                        eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2, beta3 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise FamexError("AdEMAMix does not support sparse gradients; use dense embeddings")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.int64)
                    state["exp_avg_fast"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_slow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"])
                alpha_t = ademamix_alpha(t, group["alpha"], group["t_alpha"])
                beta3_t = ademamix_beta3(t, beta3, beta1, group["t_beta3"])
                m1, m2, nu = state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"]
                m1.lerp_(g, 1.0 - beta1)
                m2.lerp_(g, 1.0 - beta3_t)
                nu.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = (nu / (1.0 - beta2**t)).sqrt_().add_(eps)
                update = (m1 / (1.0 - beta1**t)).add_(m2, alpha=alpha_t).div_(denom)
                # Weight decay uses θ before this step's update (the paper's θ_{t−1}).
                update.add_(p, alpha=wd)
                p.add_(update, alpha=-lr)
        return loss


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules (multipliers of the peak LR)

DECAY_SHAPES = ("linear", "cosine", "sqrt", "1-sqrt")


def _decay(x: float, shape: str) -> float:
    """Fraction of the peak left after a fraction x ∈ [0, 1] of the decay phase (1 → 0)."""
    if shape == "linear":
        return 1.0 - x
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    if shape == "sqrt":
        return math.sqrt(1.0 - x)
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(x)
    raise FamexError(f"unknown decay shape {shape!r}; use one of {', '.join(DECAY_SHAPES)}")


def _warmup(step: int, warmup: int) -> float | None:
    # (step + 1) / warmup: the first optimizer step already moves, the warmup-th runs at the peak.
    return (step + 1) / warmup if step < warmup else None


def wsd_schedule(
    step: int,
    total: int,
    warmup: int,
    decay_fraction: float = 0.2,
    shape: str = "1-sqrt",
    min_lr_ratio: float = 0.0,
) -> float:
    """Warm-up / stable / decay learning-rate multiplier at 0-based optimizer step `step`.

    - warm-up, step < warmup: (step + 1) / warmup (linear, reaching 1 at step warmup − 1);
    - stable: 1;
    - decay, the last D = round(decay_fraction · total) steps, starting at S = total − D: with
      x = (step − S) / D, the multiplier is min_lr_ratio + (1 − min_lr_ratio) · f(x), where f is
      "linear": 1 − x; "cosine": (1 + cos πx) / 2; "sqrt": √(1 − x); "1-sqrt": 1 − √x (the
      cool-down Hägele et al. 2024 found best for WSD). The decay starts at 1 on step S and would
      reach min_lr_ratio at step `total` (one past the last step); steps ≥ total get min_lr_ratio.
    The warm-up wins where the two overlap (very short runs).
    """
    if total < 1 or warmup < 0 or not 0.0 <= decay_fraction <= 1.0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise FamexError(
            f"bad WSD schedule: total={total} (≥ 1), warmup={warmup} (≥ 0), decay_fraction={decay_fraction} "
            f"(in [0, 1]), min_lr_ratio={min_lr_ratio} (in [0, 1])"
        )
    _decay(0.0, shape)  # validates the shape name even in the warm-up
    w = _warmup(step, warmup)
    if w is not None:
        return w
    decay_steps = round(decay_fraction * total)
    start = total - decay_steps
    if step < start:
        return 1.0
    if step >= total:
        return min_lr_ratio
    x = (step - start) / decay_steps
    return min_lr_ratio + (1.0 - min_lr_ratio) * _decay(x, shape)


def cosine_schedule(step: int, total: int, warmup: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up then cosine decay over the remaining steps, as a multiplier of the peak LR.

    Warm-up as in `wsd_schedule`; then with x = (step − warmup) / (total − warmup) the multiplier is
    min_lr_ratio + (1 − min_lr_ratio) · (1 + cos πx) / 2: 1 right after the warm-up, min_lr_ratio at
    step `total` and after.
    """
    if total < 1 or not 0 <= warmup <= total or not 0.0 <= min_lr_ratio <= 1.0:
        raise FamexError(
            f"bad cosine schedule: total={total} (≥ 1), warmup={warmup} (in [0, total]), "
            f"min_lr_ratio={min_lr_ratio} (in [0, 1])"
        )
    w = _warmup(step, warmup)
    if w is not None:
        return w
    if step >= total:
        return min_lr_ratio
    x = (step - warmup) / (total - warmup)
    return min_lr_ratio + (1.0 - min_lr_ratio) * _decay(x, "cosine")


def lr_lambda(schedule: Callable[..., float], **kwargs) -> Callable[[int], float]:
    """A one-argument function of the step for `torch.optim.lr_scheduler.LambdaLR`.

    Example: ``LambdaLR(opt, lr_lambda(wsd_schedule, total=1000, warmup=50, decay_fraction=0.2))``.
    A `functools.partial` of a module-level function, so the scheduler's state pickles; LambdaLR's
    own `state_dict` stores only its step count, which is all a resume needs.
    """
    return functools.partial(schedule, **kwargs)
