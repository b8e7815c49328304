"""fastradam.torch.RAdam's compact master weights (issue 17): ``master_weights``,
``store_param_remainders`` (Transformer Engine's names) and ``bf16_stochastic_round`` (torchao's).

Every comparison is bit for bit, against the plan-level oracle on the same data:

- ``master_weights``: each 16-bit parameter trained by the drop-in equals, after N steps (some of
  them without its gradient), :func:`fastradam.fused_step` with ``master_params`` on that tensor
  alone, started from the parameter's values: parameters, moments and master.
- ``store_param_remainders``: the master joined from (parameter, remainder) equals the
  ``master_weights`` optimizer's master; the parameters are :func:`~fastradam.reference.split_master`'s.
- ``bf16_stochastic_round``: one step gives :func:`~fastradam.reference.stochastic_round_bfloat16`
  of the ``master_weights`` run's fp32 result with the bits of each element's global index (its
  place in the concatenation of the bucket's parameters); a resumed run continues the stream.
- ``state_dict``: saved, loaded into a fresh optimizer over fresh copies of the parameters and
  trained on equals the uninterrupted run; a ``torch.optim.RAdam`` checkpoint loads in (the masters
  start from the parameters) and these load into ``torch.optim.RAdam``.

Each runs on the three gradient paths: fresh gradients gathered into the flat buffer (the layout
plan), fresh gradients stepped where they are (the tensor-list plan), and gradient views.
"""

from __future__ import annotations

import copy
import io
import pickle

import ml_dtypes
import numpy as np
import pytest
import torch

import fastradam.torch as ft
from fastradam import fused_step
from fastradam.reference import join_master, split_master, stochastic_round_bfloat16, stochastic_round_bits
from fastradam.torch import buckets

SHAPES = ((5, 7), (33,), (3,))
OPTIONS = {"lr": 3e-2, "betas": (0.9, 0.99), "weight_decay": 0.01}
STEPS = 8  # beta2 = 0.99: the first steps are below the rectification threshold, the later ones rectified
MASTER = {"master_weights": True}
REMAINDERS = {"master_weights": True, "store_param_remainders": True}
PATHS = ("gather", "tensors", "views")


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as NumPy (bfloat16 as ml_dtypes'), a view."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def make_params(dtype=torch.bfloat16, seed=0, extra_float32=False) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]
    if extra_float32:
        params.append(torch.nn.Parameter(torch.randn(4, generator=generator)))
    return params


def gradient(p: torch.Tensor, step: int, k: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + k)
    return torch.randn(p.shape, generator=generator).to(p.dtype)


def has_grad(step: int, k: int) -> bool:
    return not (k == 1 and step % 3 == 0)  # the second parameter skips some steps: steps counts differ


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "tensors":
        monkeypatch.setattr(buckets, "GATHER_BELOW", 0)  # fresh gradients stepped where they are
    return request.param


def train(optimizer, params, steps: range, path: str) -> None:
    for t in steps:
        if path == "views":
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            optimizer.zero_grad(set_to_none=False)  # the gradients become views of the flat gradient buffer
            for k, p in enumerate(params):
                if has_grad(t, k):
                    p.grad.copy_(gradient(p, t, k))
                else:
                    p.grad = None
        else:
            for k, p in enumerate(params):
                p.grad = gradient(p, t, k) if has_grad(t, k) else None
        optimizer.step()


def oracle_master(dtype, steps: int):
    """Each tensor stepped alone by fused_step with an fp32 master: (params, master, exp_avg, exp_avg_sq)."""
    moments = np.float32 if dtype == torch.float16 else ml_dtypes.bfloat16  # the drop-in's moment rule
    results = []
    for k, p in enumerate(make_params(dtype)):
        params = _numpy(p.detach().clone())
        master = params.astype(np.float32)
        exp_avg, exp_avg_sq = np.zeros(params.shape, moments), np.zeros(params.shape, moments)
        count = 0
        for t in range(steps):
            if has_grad(t, k):
                count += 1
                fused_step(params, _numpy(gradient(p, t, k)), exp_avg, exp_avg_sq, step=count, master_params=master,
                           **OPTIONS)
        results.append((params, master, exp_avg, exp_avg_sq))
    return results


# --- (a) master_weights -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_master_weights_equal_the_plan_with_master_params(dtype, path):
    params = make_params(dtype, extra_float32=True)
    optimizer = ft.RAdam(params, **OPTIONS, **MASTER)
    train(optimizer, params, range(STEPS), path)
    for p, (want_p, want_master, want_m, want_v) in zip(params, oracle_master(dtype, STEPS)):
        state = optimizer.state[p]
        assert state[buckets.MASTER_KEY].dtype == torch.float32
        assert np.array_equal(_numpy(p.detach()).view(np.uint16), want_p.view(np.uint16))
        assert np.array_equal(_numpy(state[buckets.MASTER_KEY]).view(np.uint32), want_master.view(np.uint32))
        for got, want in ((state["exp_avg"], want_m), (state["exp_avg_sq"], want_v)):
            assert _numpy(got).tobytes() == want.tobytes()
    assert buckets.MASTER_KEY not in optimizer.state[params[-1]]  # float32: nothing to keep


def test_the_master_starts_from_weights_loaded_after_construction():
    """The master is taken at a parameter's first step, not at construction: weights loaded into
    the model in between (the usual build-optimizer-then-load order) are the ones trained."""
    params = make_params()
    optimizer = ft.RAdam(params, **OPTIONS, **MASTER)
    with torch.no_grad():
        for p, q in zip(params, make_params(seed=5)):
            p.copy_(q)
    assert not optimizer.state
    train(optimizer, params, range(1, 2), "gather")
    fresh = make_params(seed=5)
    reference = ft.RAdam(fresh, **OPTIONS, **MASTER)
    train(reference, fresh, range(1, 2), "gather")
    assert all(_same(optimizer.state[p][buckets.MASTER_KEY], reference.state[q][buckets.MASTER_KEY])
               for p, q in zip(params, fresh))


# --- (b) remainders ---------------------------------------------------------------------------


def test_remainders_hold_the_master_weights_master(path):
    params = make_params(extra_float32=True)
    optimizer = ft.RAdam(params, **OPTIONS, **REMAINDERS)
    train(optimizer, params, range(STEPS), path)
    masters = make_params(extra_float32=True)
    reference = ft.RAdam(masters, **OPTIONS, **MASTER)
    train(reference, masters, range(STEPS), path)
    for p, q in zip(params[:-1], masters[:-1]):
        remainder = optimizer.state[p][buckets.MASTER_KEY]
        assert remainder.dtype == torch.int16 and remainder.shape == p.shape
        master = _numpy(reference.state[q][buckets.MASTER_KEY])
        joined = join_master(_numpy(p.detach()).view(np.uint16), remainder.numpy())
        assert np.array_equal(joined.view(np.uint32), master.view(np.uint32))
        assert np.array_equal(_numpy(p.detach()).view(np.uint16), split_master(master)[0])
        for name in ("exp_avg", "exp_avg_sq"):
            assert _same(optimizer.state[p][name], reference.state[q][name])
    assert _same(params[-1].detach(), masters[-1].detach())
    assert buckets.MASTER_KEY not in optimizer.state[params[-1]]


# --- (c) stochastic rounding ------------------------------------------------------------------


def test_stochastic_rounding_is_the_oracle_of_the_fp32_result(path):
    seed = 12345
    params = make_params(extra_float32=True)
    optimizer = ft.RAdam(params, **OPTIONS, bf16_stochastic_round=True, stochastic_round_seed=seed)
    train(optimizer, params, range(1, 2), path)  # (every parameter has a gradient at t = 1: its step 1)
    masters = make_params(extra_float32=True)
    reference = ft.RAdam(masters, **OPTIONS, **MASTER)
    train(reference, masters, range(1, 2), path)
    fp32 = np.concatenate([_numpy(reference.state[q][buckets.MASTER_KEY]).ravel() for q in masters[:-1]])
    want = stochastic_round_bfloat16(fp32, stochastic_round_bits(seed, 1, np.arange(fp32.size)))
    got = np.concatenate([_numpy(p.detach()).view(np.uint16).ravel() for p in params[:-1]])
    assert np.array_equal(got, want)
    nearest = np.concatenate([_numpy(q.detach()).view(np.uint16).ravel() for q in masters[:-1]])
    assert (got != nearest).any()  # it did round stochastically somewhere
    assert _same(params[-1].detach(), masters[-1].detach())  # float32: as without it
    assert set(optimizer.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_stochastic_rounding_draws_the_same_bits_on_every_path(monkeypatch):
    """The layout plan (gathered gradients, gradient views) and the tensor-list plan count the global
    index over the same tensors, so they round alike, steps with skipped gradients included."""
    runs = []
    for path in PATHS:
        monkeypatch.setattr(buckets, "GATHER_BELOW", 0 if path == "tensors" else 1 << 20)
        params = make_params()
        train(ft.RAdam(params, **OPTIONS, bf16_stochastic_round=True, stochastic_round_seed=5), params,
              range(STEPS), path)
        runs.append(torch.cat([_bits(p.detach()).ravel() for p in params]))
    assert all(torch.equal(run, runs[0]) for run in runs)


def test_seeds_differ_and_default_to_torchs_initial_seed():
    runs = {}
    for seed in (1, 2, None):
        torch.manual_seed(7)
        params = make_params()
        optimizer = ft.RAdam(params, **OPTIONS, bf16_stochastic_round=True, stochastic_round_seed=seed)
        train(optimizer, params, range(3), "gather")
        runs[seed] = torch.cat([_bits(p.detach()).ravel() for p in params])
        assert optimizer.state_dict()["param_groups"][0][ft.SEED_KEY] == (7 if seed is None else seed)
    assert not torch.equal(runs[1], runs[2])
    torch.manual_seed(7)
    params = make_params()
    train(ft.RAdam(params, **OPTIONS, bf16_stochastic_round=True, stochastic_round_seed=7), params, range(3), "gather")
    assert torch.equal(torch.cat([_bits(p.detach()).ravel() for p in params]), runs[None])


# --- (d) state_dict round trips -----------------------------------------------------------------

KEEPINGS = {"master": MASTER, "remainders": REMAINDERS, "stochastic": {"bf16_stochastic_round": True,
                                                                       "stochastic_round_seed": 99}}


def _resumed(keeping: dict, path: str, via: str, dtype=torch.bfloat16):
    """(uninterrupted params and state, resumed params and state) after STEPS steps, saved at STEPS // 2."""
    whole = make_params(dtype, extra_float32=True)
    optimizer = ft.RAdam(whole, **OPTIONS, **keeping)
    train(optimizer, whole, range(STEPS), path)
    first = make_params(dtype, extra_float32=True)
    half = ft.RAdam(first, **OPTIONS, **keeping)
    train(half, first, range(STEPS // 2), path)
    saved = half.state_dict()
    if via == "torch.save":
        buffer = io.BytesIO()
        torch.save({"model": [p.detach() for p in first], "optimizer": saved}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        values, saved = loaded["model"], loaded["optimizer"]
    else:
        values = [p.detach().clone() for p in first]
        saved = copy.deepcopy(saved)
    del half, first
    resumed = make_params(dtype, seed=9, extra_float32=True)  # other values: the optimizer is built before the load
    optimizer2 = ft.RAdam(resumed, **OPTIONS, **{**keeping, **({"stochastic_round_seed": 1}
                                                             if "stochastic_round_seed" in keeping else {})})
    optimizer2.load_state_dict(saved)
    with torch.no_grad():
        for p, value in zip(resumed, values):
            p.copy_(value)  # the model's weights loaded after the optimizer's state
    train(optimizer2, resumed, range(STEPS // 2, STEPS), path)
    return (whole, optimizer), (resumed, optimizer2)


@pytest.mark.parametrize("keeping", KEEPINGS, ids=str)
@pytest.mark.parametrize("via", ("state_dict", "torch.save"))
def test_a_resumed_run_is_the_uninterrupted_one(keeping, via, path):
    (whole, optimizer), (resumed, optimizer2) = _resumed(KEEPINGS[keeping], path, via)
    for p, q in zip(whole, resumed):
        assert _same(p.detach(), q.detach())
        assert optimizer.state[p].keys() == optimizer2.state[q].keys()
        for name, value in optimizer.state[p].items():
            assert _same(value, optimizer2.state[q][name]), name


def test_float16_master_weights_resume_exactly():
    """float16 parameters' float32 moments are saved as they are with master_weights (as float16,
    torch's state dtype, without): the resumed run is the uninterrupted one."""
    (whole, _), (resumed, _) = _resumed(MASTER, "gather", "state_dict", torch.float16)
    assert all(_same(p.detach(), q.detach()) for p, q in zip(whole, resumed))


def test_a_torch_checkpoint_starts_the_masters_from_the_parameters():
    """torch.optim.RAdam's checkpoint (no masters) loaded, then the model's weights: the next step
    is fused_step's with the master taken from those weights (remainders: zero, the same master)."""
    params = make_params()
    torch_optimizer = torch.optim.RAdam(params, **OPTIONS)
    train(torch_optimizer, params, range(1, 4), "gather")
    saved, values = torch_optimizer.state_dict(), [p.detach().clone() for p in params]
    for keeping in (MASTER, REMAINDERS):
        mine = make_params(seed=9)
        optimizer = ft.RAdam(mine, **OPTIONS, **keeping)
        optimizer.load_state_dict(saved)
        with torch.no_grad():
            for p, value in zip(mine, values):
                p.copy_(value)
        if keeping is MASTER:
            assert all(buckets.MASTER_KEY not in optimizer.state[p] for p in mine)  # not taken yet
        train(optimizer, mine, range(4, 5), "gather")
        for k, (p, value) in enumerate(zip(mine, values)):
            entry = saved["state"][k]
            want_p, want_master = _numpy(value.clone()), _numpy(value.float())
            exp_avg, exp_avg_sq = _numpy(entry["exp_avg"].clone()), _numpy(entry["exp_avg_sq"].clone())
            fused_step(want_p, _numpy(gradient(p, 4, k)), exp_avg, exp_avg_sq, step=int(entry["step"]) + 1,
                       master_params=want_master, **OPTIONS)
            master = optimizer.state[p][buckets.MASTER_KEY]
            if keeping is REMAINDERS:
                master = join_master(_numpy(p.detach()).view(np.uint16), master.numpy())
            assert np.array_equal(np.asarray(master).view(np.uint32), want_master.view(np.uint32))


@pytest.mark.parametrize("keeping", KEEPINGS, ids=str)
def test_these_checkpoints_load_into_torch(keeping):
    """torch.optim.RAdam takes them: it casts ``master_param`` to the parameter's dtype, carries it
    along unused and steps from the parameters (the seed stays in its groups)."""
    params = make_params()
    optimizer = ft.RAdam(params, **OPTIONS, **KEEPINGS[keeping])
    train(optimizer, params, range(3), "gather")
    saved = optimizer.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_optimizer = torch.optim.RAdam(copies, **OPTIONS)
    torch_optimizer.load_state_dict(saved)
    train(torch_optimizer, copies, range(3, 5), "gather")
    assert all(torch.isfinite(p.detach().float()).all() for p in copies)
    plain = ft.RAdam(make_params(seed=9), **OPTIONS)
    plain.load_state_dict(saved)  # a plain optimizer keeps no master: the entries drop it
    assert all(buckets.MASTER_KEY not in entry for entry in plain.state.values())


def test_copies_and_removed_parameters_keep_their_masters():
    params = make_params()
    optimizer = ft.RAdam(params, **OPTIONS, **MASTER)
    train(optimizer, params, range(3), "gather")
    copied = copy.deepcopy((params, optimizer))
    unpickled = pickle.loads(pickle.dumps((params, optimizer)))
    for other_params, other in (copied, unpickled):
        assert other._keeping == optimizer._keeping
        for p, q in zip(params, other_params):
            assert _same(optimizer.state[p][buckets.MASTER_KEY], other.state[q][buckets.MASTER_KEY])
            assert other.state[q][buckets.MASTER_KEY].untyped_storage().data_ptr() == \
                other._buckets[0].keeper_flat.untyped_storage().data_ptr()
        train(other, other_params, range(3, 5), "gather")
    train(optimizer, params, range(3, 5), "gather")
    assert all(_same(p.detach(), q.detach()) and _same(p.detach(), r.detach())
               for p, q, r in zip(params, copied[0], unpickled[0]))
    removed = optimizer.param_groups[0]["params"].pop(1)
    train(optimizer, params[:1] + params[2:], range(5, 6), "gather")
    flat = optimizer._buckets[0].keeper_flat.untyped_storage().data_ptr()
    assert optimizer.state[removed][buckets.MASTER_KEY].untyped_storage().data_ptr() != flat  # its own copy
    assert all(optimizer.state[p][buckets.MASTER_KEY].untyped_storage().data_ptr() == flat
               for p in optimizer.param_groups[0]["params"])


def test_a_master_set_by_hand_is_stepped():
    params = make_params()
    optimizer = ft.RAdam(params, **OPTIONS, **MASTER)
    train(optimizer, params, range(2), "gather")
    new = optimizer.state[params[0]][buckets.MASTER_KEY] + 0.25
    optimizer.state[params[0]][buckets.MASTER_KEY] = new
    train(optimizer, params, range(2, 3), "gather")
    assert not _same(optimizer.state[params[0]][buckets.MASTER_KEY], new)  # stepped from it, in the buffer
    assert abs(float((optimizer.state[params[0]][buckets.MASTER_KEY] - new).abs().max())) < 0.1
    del optimizer.state[params[1]]  # fresh state: the master starts from the parameter again
    value = params[1].detach().float().clone()
    train(optimizer, params, range(4, 5), "gather")
    assert (optimizer.state[params[1]][buckets.MASTER_KEY] - value).abs().max() < 0.1


# --- (e) errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, words", [
    ({"store_param_remainders": True}, ValueError, "needs master_weights=True"),
    ({"bf16_stochastic_round": True, "master_weights": True}, ValueError, "replaces master_weights"),
    ({"stochastic_round_seed": 3}, ValueError, "pass it with that"),
    ({"bf16_stochastic_round": True, "stochastic_round_seed": 1.5}, TypeError, "must be an int"),
    ({"bf16_stochastic_round": True, "stochastic_round_seed": -1}, ValueError, "2\\*\\*64"),
    ({"master_weights": 1}, TypeError, "master_weights must be a bool"),
    ({"bf16_stochastic_round": "yes"}, TypeError, "bf16_stochastic_round must be a bool"),
])
def test_bad_options_are_refused(kwargs, error, words):
    params = make_params()
    before = [p.detach().clone() for p in params]
    with pytest.raises(error, match=words):
        ft.RAdam(params, **kwargs)
    assert all(_same(p.detach(), b) and p.data.data_ptr() != 0 for p, b in zip(params, before))


def test_remainders_refuse_float16_and_need_bfloat16():
    with pytest.raises(TypeError, match="torch.float16: store_param_remainders"):
        ft.RAdam(make_params() + make_params(torch.float16), **REMAINDERS)
    with pytest.raises(TypeError, match="bfloat16 parameters, and there is none"):
        ft.RAdam(make_params(torch.float32), **REMAINDERS)
    with pytest.raises(TypeError, match="bfloat16 parameters, and there is none"):
        ft.RAdam(make_params(torch.float16), bf16_stochastic_round=True)
    optimizer = ft.RAdam(make_params(), **REMAINDERS)
    with pytest.raises(TypeError, match="torch.float16"):
        optimizer.add_param_group({"params": make_params(torch.float16)})
    assert len(optimizer.param_groups) == 1
    ft.RAdam(make_params(torch.float32), **MASTER)  # float32 parameters are their own master: accepted


def test_stochastic_rounding_refuses_capturable():
    with pytest.raises(ValueError, match="not with capturable=True"):
        ft.RAdam(make_params(), capturable=True, bf16_stochastic_round=True)


def test_a_master_of_the_wrong_format_is_refused_before_anything_is_loaded():
    params = make_params()
    optimizer = ft.RAdam(params, **REMAINDERS)
    train(optimizer, params, range(2), "gather")
    remainders = optimizer.state_dict()
    masters_params = make_params()
    masters = ft.RAdam(masters_params, **MASTER)
    train(masters, masters_params, range(2), "gather")
    before = {k: v.clone() for k, v in masters.state[masters_params[0]].items()}
    with pytest.raises(ValueError, match="int16 tensor.*other store_param_remainders"):
        optimizer.load_state_dict(masters.state_dict())
    with pytest.raises(ValueError, match="float32 tensor.*other store_param_remainders"):
        masters.load_state_dict(remainders)
    bad = copy.deepcopy(masters.state_dict())
    bad["state"][0][buckets.MASTER_KEY] = bad["state"][0][buckets.MASTER_KEY].bfloat16()
    with pytest.raises(ValueError, match="casts it to the parameter's dtype"):
        masters.load_state_dict(bad)
    bad = copy.deepcopy(masters.state_dict())
    bad["param_groups"][0][ft.SEED_KEY] = "seven"
    with pytest.raises(TypeError, match="stochastic_round_seed must be an int"):
        masters.load_state_dict(bad)
    assert all(_same(v, masters.state[masters_params[0]][k]) for k, v in before.items())
