"""Flavours: every preset through the backends, and the oracle against each peer's own formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastradam import PRESETS, Flavour, KerasWarmup, fused_step
from fastradam.reference import reference_step
from tests.cases import random_buffers
from tests.oracle_check import assert_matches_oracle


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flavour", sorted(PRESETS))
@pytest.mark.parametrize("step", [1, 4, 5, 6, 9, 1000])
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
                                     {"weight_decay": 0.1, "maximize": True}], ids=str)
def test_every_preset_matches_the_oracle(dtype, flavour, step, options):
    buffers = random_buffers(1031, dtype, seed=step)
    before = tuple(b.copy() for b in buffers)
    hyper = {"step": step, "lr": 1e-2, "flavour": flavour, **options}
    fused_step(*buffers, **hyper)
    assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), hyper)


def test_authors_flavour_holds_parameters_below_the_threshold():
    p, g, m, v = random_buffers(100, np.float64, seed=0)
    p0 = p.copy()
    for step in range(1, 5):  # rho_t < 5 for steps 1..4 with beta2 = 0.999
        fused_step(p, g, m, v, step=step, weight_decay=0.5, decoupled_weight_decay=True, flavour="authors")
        assert p.tobytes() == p0.tobytes(), "authors flavour changed p (or decayed it) below the threshold"
    fused_step(p, g, m, v, step=5, flavour="authors")  # rho_5 = 4.996 < 5: still held
    assert p.tobytes() == p0.tobytes()
    fused_step(p, g, m, v, step=6, flavour="authors")
    assert not np.array_equal(p, p0)


def test_threshold_comparisons_differ_where_the_peers_do():
    """rho_t = 5 exactly is rectified by '>=' flavours and not by torch's '>'; the paper's 4 rectifies step 5."""
    for name, rectified_at_5 in [("torch", False), ("paper", True), ("timm_legacy", False)]:
        p, g, m, v = (np.array([1.0]), np.array([0.5]), np.array([0.1]), np.array([0.04]))
        out, _, _ = reference_step(p, g, m, v, step=5, flavour=name)
        momentum = 1.0 - 1e-3 * (0.9 * 0.1 + 0.1 * 0.5) / (1 - 0.9**5)
        assert (out[0] != pytest.approx(momentum, rel=1e-12)) == rectified_at_5, name
    assert Flavour("x", inclusive=True).rectifies(5.0) and not Flavour("x").rectifies(5.0)


def test_bad_flavours():
    with pytest.raises(ValueError, match="threshold must be >= 4"):
        Flavour("x", threshold=3.0)
    with pytest.raises(ValueError, match="inclusive flavour needs a threshold > 4"):
        Flavour("x", threshold=4.0, inclusive=True)
    with pytest.raises(ValueError, match="below_threshold must be"):
        Flavour("x", below_threshold="sgd")
    with pytest.raises(ValueError, match="flavour must be one of"):
        fused_step(*random_buffers(3, np.float32, 0), step=1, flavour="adam")
    with pytest.raises(TypeError, match="flavour must be a preset name or a Flavour"):
        fused_step(*random_buffers(3, np.float32, 0), step=1, flavour=5)


# --- the peers' own update rules, transcribed from their sources, one scalar step at a time ---

def _authors_step(p, g, m, v, t, lr, b1, b2, eps, wd):
    """LiyuanLucasLiu/RAdam ``RAdam.step`` with degenerated_to_sgd=False."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    beta2_t = b2**t
    n_sma_max = 2 / (1 - b2) - 1
    n_sma = n_sma_max - 2 * t * beta2_t / (1 - beta2_t)
    if n_sma >= 5:
        step_size = math.sqrt((1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma
                              * n_sma_max / (n_sma_max - 2)) / (1 - b1**t)
        p = p + (-wd * lr) * p
        p = p - step_size * lr * m / (np.sqrt(v) + eps)
    return p, m, v


def _keras_step(p, g, m, v, t, lr, b1, b2, eps, wd, total_steps, warmup_proportion, min_lr):
    """keras-radam ``RAdam._resource_apply_dense`` (TFA RectifiedAdam is the same rule)."""
    warmup_steps = total_steps * warmup_proportion
    decay_steps = max(total_steps - warmup_steps, 1)
    decay_rate = (min_lr - lr) / decay_steps
    lr_t = lr * (t / warmup_steps) if t <= warmup_steps else lr + decay_rate * min(t - warmup_steps, decay_steps)
    sma_inf = 2 / (1 - b2) - 1
    sma_t = sma_inf - 2 * t * b2**t / (1 - b2**t)
    m = b1 * m + (1 - b1) * g
    m_corr = m / (1 - b1**t)
    v = b2 * v + (1 - b2) * g * g
    v_corr = np.sqrt(v / (1 - b2**t))
    r_t = math.sqrt((sma_t - 4) / (sma_inf - 4) * (sma_t - 2) / (sma_inf - 2) * sma_inf / sma_t) if sma_t >= 4 else 0
    var_t = r_t * m_corr / (v_corr + eps) if sma_t >= 5 else m_corr
    var_t = var_t + wd * p
    return p - lr_t * var_t, m, v


def _trajectory(step_fn, ours, steps=120, **kwargs):
    rng = np.random.default_rng(5)
    n = 64
    start = rng.standard_normal(n)
    theirs_state = (start, np.zeros(n), np.zeros(n))
    ours_state = (start, np.zeros(n), np.zeros(n))
    for t in range(1, steps + 1):
        g = rng.standard_normal(n)
        theirs_state = step_fn(theirs_state[0], g, theirs_state[1], theirs_state[2], t, **kwargs)
        ours_state = ours(ours_state, g, t)
    for a, b in zip(ours_state, theirs_state):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)


def test_oracle_authors_flavour_follows_the_authors_code():
    _trajectory(_authors_step,
                lambda s, g, t: reference_step(s[0], g, s[1], s[2], step=t, lr=0.01, weight_decay=0.1,
                                               decoupled_weight_decay=True, flavour="authors"),
                lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.1)


@pytest.mark.parametrize("preset", ["keras", "tfa"])
def test_oracle_keras_flavour_and_schedule_follow_keras_radam(preset):
    schedule = KerasWarmup(total_steps=100, warmup_proportion=0.1, min_lr=1e-5)

    def ours(s, g, t):
        lr_t = schedule.lr_at(t, 1e-2)
        return reference_step(s[0], g, s[1], s[2], step=t, lr=lr_t, eps=1e-7, weight_decay=0.01,
                              decoupled_weight_decay=True, flavour=preset)

    _trajectory(_keras_step, ours, lr=1e-2, b1=0.9, b2=0.999, eps=1e-7, wd=0.01,
                total_steps=100, warmup_proportion=0.1, min_lr=1e-5)


def test_keras_schedule_through_fused_step_matches_the_oracle_with_the_scheduled_lr():
    schedule = KerasWarmup(total_steps=50, warmup_proportion=0.2, min_lr=1e-4)
    for step in (1, 5, 10, 11, 30, 50, 80):
        buffers = random_buffers(257, np.float64, seed=step)
        before = tuple(b.copy() for b in buffers)
        fused_step(*buffers, step=step, lr=1e-2, flavour="keras", schedule=schedule,
                   weight_decay=0.01, decoupled_weight_decay=True)
        hyper = {"step": step, "lr": schedule.lr_at(step, 1e-2), "flavour": "keras",
                 "weight_decay": 0.01, "decoupled_weight_decay": True}
        assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), hyper)


def test_keras_schedule_values():
    s = KerasWarmup(total_steps=100, warmup_proportion=0.1, min_lr=0.0)
    assert s.lr_at(1, 1.0) == pytest.approx(0.1)
    assert s.lr_at(10, 1.0) == pytest.approx(1.0)
    assert s.lr_at(55, 1.0) == pytest.approx(0.5)
    assert s.lr_at(100, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert s.lr_at(500, 1.0) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="total_steps"):
        KerasWarmup(total_steps=0)


@pytest.mark.parametrize("eps_root", (0.0, 1e-6))
def test_oracle_and_backend_optax_flavour_follow_optax_itself(eps_root):
    """optax.radam (eps_root too: 1/(sqrt(v_hat + eps_root) + eps)) in float64, against the oracle
    and the Numba backend's float64 step, over 120 steps from zero moments."""
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(9)
    n = 64
    params = rng.standard_normal(n)
    optimizer = optax.radam(learning_rate=3e-3, eps_root=eps_root)
    theirs = jnp.asarray(params)
    state = optimizer.init(theirs)
    ours = (params, np.zeros(n), np.zeros(n))
    backend = [params.copy(), None, np.zeros(n), np.zeros(n)]
    for t in range(1, 121):
        g = rng.standard_normal(n)
        updates, state = optimizer.update(jnp.asarray(g), state, theirs)
        theirs = optax.apply_updates(theirs, updates)
        ours = reference_step(ours[0], g, ours[1], ours[2], step=t, lr=3e-3, flavour="optax", eps_root=eps_root)
        backend[1] = g
        fused_step(*backend, step=t, lr=3e-3, flavour="optax", eps_root=eps_root)
    radam_state = state[0]
    for mine in (ours, (backend[0], backend[2], backend[3])):
        np.testing.assert_allclose(mine[0], np.asarray(theirs), rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(mine[1], np.asarray(radam_state.mu), rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(mine[2], np.asarray(radam_state.nu), rtol=1e-11, atol=1e-14)
