"""The oracle against hand-derived values and against torch.optim.RAdam itself."""

from __future__ import annotations

import numpy as np
import pytest

from fastradam.reference import reference_step

mpmath = pytest.importorskip("mpmath")


def _scalar_radam(p, g, m, v, steps, lr, beta1, beta2, eps):
    """Textbook RAdam on one scalar in 50-digit arithmetic, an independent path to the oracle's values."""
    mp = mpmath.mp
    mp.dps = 50
    p, g, m, v = (mp.mpf(x) for x in (p, g, m, v))
    beta1, beta2, lr, eps = mp.mpf(beta1), mp.mpf(beta2), mp.mpf(lr), mp.mpf(eps)
    out = []
    rho_inf = 2 / (1 - beta2) - 1
    for t in range(1, steps + 1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        if rho_t > 5:
            r_t = mp.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            p = p - lr * m_hat * r_t * mp.sqrt(1 - beta2**t) / (mp.sqrt(v) + eps)
        else:
            p = p - lr * m_hat
        out.append((float(p), float(m), float(v)))
    return out


def test_first_step_by_hand():
    # t=1: m = 0.1*0.5 = 0.05, v = 0.001*0.25, rho_1 = 1999 - 2*0.999/0.001 = 1 <= 5, so
    # p = 1 - lr * m / (1 - 0.9) = 1 - 0.1 * 0.5 = 0.95
    p, m, v = reference_step(np.array([1.0]), np.array([0.5]), np.zeros(1), np.zeros(1), step=1, lr=0.1)
    np.testing.assert_allclose(p, [0.95], rtol=1e-15)
    np.testing.assert_allclose(m, [0.05], rtol=1e-15)
    np.testing.assert_allclose(v, [0.00025], rtol=1e-15)


def test_steps_one_to_seven_cross_the_threshold():
    # With beta2 = 0.999, rho_5 = 4.996 (momentum step) and rho_6 = 5.994 (rectified step).
    p0 = np.array([1.0, -2.0, 0.3])
    grads = np.array([0.5, -0.25, 3.0])
    expected = [_scalar_radam(p0[i], grads[i], 0.0, 0.0, 7, 0.01, 0.9, 0.999, 1e-8) for i in range(3)]
    p, m, v = p0.copy(), np.zeros(3), np.zeros(3)
    for t in range(1, 8):
        p, m, v = reference_step(p, grads, m, v, step=t, lr=0.01)
        want = np.array([expected[i][t - 1] for i in range(3)]).T
        np.testing.assert_allclose(np.stack([p, m, v]), want, rtol=1e-13, err_msg=f"step {t}")


torch = pytest.importorskip("torch")

TORCH_OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"maximize": True, "weight_decay": 0.01},
    {"betas": (0.5, 0.99), "lr": 0.05, "eps": 1e-6},
    {"betas": (0.0, 0.99999), "lr": 1e-4},
    {"betas": (0.99, 0.9), "lr": 0.02},
]


@pytest.mark.parametrize("options", TORCH_OPTIONS, ids=str)
def test_oracle_follows_torch_radam_for_150_steps(options):
    rng = np.random.default_rng(7)
    n = 257
    p = rng.standard_normal(n)
    m = np.zeros(n)
    v = np.zeros(n)
    param = torch.nn.Parameter(torch.tensor(p, dtype=torch.float64))
    optimizer = torch.optim.RAdam([param], foreach=False, **options)
    for t in range(1, 151):
        grad = rng.standard_normal(n) * (1 + np.sin(t))
        param.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
        p, m, v = reference_step(p, grad, m, v, step=t, **options)
    state = optimizer.state[param]
    for ours, theirs in ((p, param), (m, state["exp_avg"]), (v, state["exp_avg_sq"])):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_oracle_is_pure():
    buffers = [np.arange(1.0, 5.0) for _ in range(4)]
    copies = [b.copy() for b in buffers]
    reference_step(*buffers, step=10, weight_decay=0.1, decoupled_weight_decay=True)
    for before, after in zip(copies, buffers):
        np.testing.assert_array_equal(before, after)
