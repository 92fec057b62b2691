"""famex.distill.optim: AdEMAMix against steps written out by hand, and the LR schedules' shapes."""

from __future__ import annotations

import io
import math

import pytest
import torch

from famex.distill.optim import (
    AdEMAMix,
    ademamix_alpha,
    ademamix_beta3,
    cosine_schedule,
    lr_lambda,
    wsd_schedule,
)
from famex.errors import FamexError

THETA0 = [1.0, -2.0, 0.5]
G1 = [0.1, -0.3, 0.2]
G2 = [-0.2, 0.1, 0.4]
LR, B1, B2, B3, ALPHA, EPS, WD = 0.01, 0.9, 0.999, 0.9999, 5.0, 1e-8, 0.1


def _steps(grads, **kw):
    p = torch.nn.Parameter(torch.tensor(THETA0, dtype=torch.float64))
    opt = AdEMAMix([p], lr=LR, betas=(B1, B2, B3), alpha=ALPHA, eps=EPS, weight_decay=WD, **kw)
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(p.detach().clone().tolist())
    return out


def test_one_step_by_hand():
    # Step 1 from zero state: m̂1 = g, ν̂ = g², m2 = (1 − β3)·g, so the update is
    # g·(1 + α(1 − β3)) / (|g| + ε) + λθ0.
    (theta1,) = _steps([G1])
    for th0, g, th1 in zip(THETA0, G1, theta1):
        expected = th0 - LR * (g * (1 + ALPHA * (1 - B3)) / (abs(g) + EPS) + WD * th0)
        assert th1 == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # Numbers worked on paper for the first coordinate: 1 − 0.01·(1.0005·0.1/(0.1 + 1e-8) + 0.1).
    assert theta1[0] == pytest.approx(0.988995, abs=1e-6)


def test_two_steps_by_hand():
    theta1, theta2 = _steps([G1, G2])
    for th0, g1, g2, th1, th2 in zip(THETA0, G1, G2, theta1, theta2):
        m1 = B1 * ((1 - B1) * g1) + (1 - B1) * g2
        m2 = B3 * ((1 - B3) * g1) + (1 - B3) * g2
        nu = B2 * ((1 - B2) * g1 * g1) + (1 - B2) * g2 * g2
        m1_hat = m1 / (1 - B1**2)  # = m1 / 0.19
        nu_hat = nu / (1 - B2**2)  # = nu / 0.001999
        expected = th1 - LR * ((m1_hat + ALPHA * m2) / (math.sqrt(nu_hat) + EPS) + WD * th1)
        assert th2 == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmups_enter_the_step():
    # With T_α = T_β3 = 4, step 1 uses α = 5/4 and β3 from the paper's formula at t/T = 1/4.
    (theta1,) = _steps([G1], t_alpha=4, t_beta3=4)
    alpha1 = ALPHA / 4
    beta3_1 = math.exp(math.log(B1) * math.log(B3) / (0.75 * math.log(B3) + 0.25 * math.log(B1)))
    for th0, g, th1 in zip(THETA0, G1, theta1):
        expected = th0 - LR * (g * (1 + alpha1 * (1 - beta3_1)) / (abs(g) + EPS) + WD * th0)
        assert th1 == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_schedulers_key_points():
    assert ademamix_alpha(0, 8.0, 100) == 0.0
    assert ademamix_alpha(50, 8.0, 100) == pytest.approx(4.0)
    assert ademamix_alpha(100, 8.0, 100) == 8.0
    assert ademamix_alpha(1000, 8.0, 100) == 8.0
    assert ademamix_alpha(3, 8.0, None) == 8.0
    assert ademamix_beta3(0, 0.9999, 0.9, 100) == pytest.approx(0.9)
    assert ademamix_beta3(100, 0.9999, 0.9, 100) == 0.9999
    assert ademamix_beta3(5, 0.9999, 0.9, None) == 0.9999
    # The warm-up is linear in the half-life ln(0.5)/ln(β): midway is the mean of the two.
    half = lambda b: math.log(0.5) / math.log(b)
    assert half(ademamix_beta3(50, 0.9999, 0.9, 100)) == pytest.approx((half(0.9) + half(0.9999)) / 2)
    values = [ademamix_beta3(t, 0.9999, 0.9, 100) for t in range(101)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_alpha_zero_is_adamw():
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 4)
    b = torch.nn.Linear(6, 4)
    b.load_state_dict(a.state_dict())
    opt_a = AdEMAMix(a.parameters(), lr=3e-3, betas=(0.9, 0.95, 0.999), alpha=0.0, weight_decay=0.05)
    opt_b = torch.optim.AdamW(b.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for _ in range(5):
        x = torch.randn(8, 6)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_resumes_exactly():
    def make():
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 3)
        opt = AdEMAMix(model.parameters(), lr=1e-2, t_alpha=6, t_beta3=6, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(wsd_schedule, total=6, warmup=2, decay_fraction=0.5))
        return model, opt, sched

    data = [torch.randn(4, 5, generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def train(model, opt, sched, batches):
        for x in batches:
            opt.zero_grad()
            model(x).sin().sum().backward()
            opt.step()
            sched.step()

    model, opt, sched = make()
    train(model, opt, sched, data)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = make()
    train(model, opt, sched, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt, sched = make()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    assert int(opt.state[next(model.parameters())]["step"]) == 3
    train(model, opt, sched, data[3:])
    for p, q in zip(model.parameters(), uninterrupted):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "shape,f",
    [
        ("linear", lambda x: 1 - x),
        ("cosine", lambda x: 0.5 * (1 + math.cos(math.pi * x))),
        ("sqrt", lambda x: math.sqrt(1 - x)),
        ("1-sqrt", lambda x: 1 - math.sqrt(x)),
    ],
)
def test_wsd_shape_at_key_points(shape, f):
    kw = dict(total=100, warmup=10, decay_fraction=0.2, shape=shape, min_lr_ratio=0.1)
    assert wsd_schedule(0, **kw) == pytest.approx(0.1)  # first warm-up step: 1/10
    assert wsd_schedule(4, **kw) == pytest.approx(0.5)
    assert wsd_schedule(9, **kw) == 1.0  # end of warm-up
    assert wsd_schedule(10, **kw) == 1.0 and wsd_schedule(79, **kw) == 1.0  # stable
    assert wsd_schedule(80, **kw) == pytest.approx(1.0)  # decay starts at the peak
    assert wsd_schedule(90, **kw) == pytest.approx(0.1 + 0.9 * f(0.5))
    assert wsd_schedule(99, **kw) == pytest.approx(0.1 + 0.9 * f(0.95))
    assert wsd_schedule(100, **kw) == pytest.approx(0.1) and wsd_schedule(500, **kw) == pytest.approx(0.1)
    decay = [wsd_schedule(s, **kw) for s in range(80, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_cosine_schedule_key_points():
    assert cosine_schedule(0, total=100) == 1.0
    assert cosine_schedule(50, total=100) == pytest.approx(0.5)
    assert cosine_schedule(100, total=100) == pytest.approx(0.0)
    kw = dict(total=110, warmup=10, min_lr_ratio=0.2)
    assert cosine_schedule(0, **kw) == pytest.approx(0.1)
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert cosine_schedule(60, **kw) == pytest.approx(0.6)
    assert cosine_schedule(110, **kw) == pytest.approx(0.2)


def test_lambda_lr_follows_the_schedule():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AdEMAMix([p], lr=6e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(wsd_schedule, total=20, warmup=3, decay_fraction=0.25, shape="linear")
    )
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(6e-4 * wsd_schedule(step, 20, 3, 0.25, "linear"))
        p.grad = torch.ones(2)
        opt.step()
        sched.step()


def test_bad_arguments_are_named():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(FamexError, match="betas"):
        AdEMAMix(p, betas=(0.9, 0.999))
    with pytest.raises(FamexError, match="alpha"):
        AdEMAMix(p, alpha=-1.0)
    with pytest.raises(FamexError, match="shape"):
        wsd_schedule(0, 10, 1, shape="exp")
    with pytest.raises(FamexError, match="WSD"):
        wsd_schedule(0, 10, 1, decay_fraction=1.5)
