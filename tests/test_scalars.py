"""The host scalar module: branch, folded step size, and extreme steps."""

from __future__ import annotations

import math

import pytest

from fastradam.flavours import PRESETS
from fastradam.scalars import HOLD, MOMENTUM, RECTIFIED, sma_length, step_scalars

DEFAULTS = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                decoupled_weight_decay=False, maximize=False)


def test_threshold_between_steps_five_and_six():
    assert sma_length(5, 0.999)[1] == pytest.approx(4.996, abs=1e-3)
    assert sma_length(6, 0.999)[1] == pytest.approx(5.994, abs=1e-3)
    assert step_scalars(step=5, **DEFAULTS).mode == MOMENTUM
    assert step_scalars(step=6, **DEFAULTS).mode == RECTIFIED


def test_step_size_below_threshold_is_bias_corrected_lr():
    s = step_scalars(step=3, **DEFAULTS)
    assert s.step_size == pytest.approx(1e-3 / (1 - 0.9**3), rel=1e-15)


def test_step_size_rectified_folds_r_t_and_bias_corrections():
    t = 10
    rho_inf = 2 / 0.001 - 1
    rho_t = rho_inf - 2 * t * 0.999**t / (1 - 0.999**t)
    r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    want = 1e-3 * r_t * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    assert step_scalars(step=t, **DEFAULTS).step_size == pytest.approx(want, rel=1e-14)


def test_huge_step_underflows_cleanly():
    s = step_scalars(step=10**7, **DEFAULTS)
    assert s.mode == RECTIFIED
    # beta^t underflows to 0: bias corrections are 1 and r_t is 1 (rho_t = rho_inf).
    assert s.step_size == pytest.approx(1e-3, rel=1e-15)


def test_beta2_zero_never_rectifies():
    for t in (1, 6, 1000):
        assert step_scalars(step=t, **{**DEFAULTS, "beta2": 0.0}).mode == MOMENTUM


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_is_either_l2_or_decoupled(decoupled):
    s = step_scalars(step=1, **{**DEFAULTS, "lr": 0.1, "weight_decay": 0.5, "decoupled_weight_decay": decoupled})
    assert (s.l2_weight_decay, s.param_decay) == ((0.0, 0.95) if decoupled else (0.5, 1.0))


def test_hold_mode_neither_steps_nor_decays():
    s = step_scalars(step=3, **{**DEFAULTS, "weight_decay": 0.5, "decoupled_weight_decay": True},
                     flavour=PRESETS["authors"])
    assert (s.mode, s.step_size, s.param_decay) == (HOLD, 0.0, 1.0)


def test_eps_on_v_hat_is_folded_into_eps():
    t = 10
    s = step_scalars(step=t, **DEFAULTS, flavour=PRESETS["optax"])
    assert s.eps == pytest.approx(1e-8 * math.sqrt(1 - 0.999**t), rel=1e-15)
    assert s.step_size == step_scalars(step=t, **DEFAULTS).step_size
