"""Gradient clipping and AMP in the drop-in (issue 19): ``optimizer.clip_grad_norm_`` and
``fastradam.torch.GradScaler`` against ``torch.nn.utils.clip_grad_norm_`` + ``torch.optim.RAdam``
(and ``torch.amp.GradScaler``).

- float32/float64: the drop-in's trajectory with ``optimizer.clip_grad_norm_`` before each step
  equals torch's with ``clip_grad_norm_`` (two param groups, a parameter that skips some steps,
  norm types 2, 1, inf and 3, max_norm below and above the norm), on the three gradient paths
  (fresh gradients gathered into the flat buffer, fresh gradients stepped where they are, gradient
  views), to the tolerances of tests/test_torch_optimizer.py scaled to these few steps: the
  clipped gradients differ from torch's by the rounding of one product (torch rounds
  ``g * coef`` to the gradient dtype, the step rounds ``inv_scale * coef`` once), a few ulps.
- The returned norm equals torch's (rtol 1e-6 in float32; its dtype and device are torch's) and
  the gradients are never written.
- bfloat16/float16 (with master_weights / store_param_remainders / stochastic rounding where the
  drop-in has them): the reference is torch's float32 run on the gradients cast up (the drop-in's
  math is float32): the fp32 masters to float32 tolerance, the 16-bit parameters to the parameters'
  own rounding (a few units of their last place: :data:`SIXTEEN_BIT_TOLERANCE`), as in
  tests/test_torch_master.py's float32-master reasoning and tests/test_torch_dtypes.py's bfloat16 one.
- AMP: ``torch.amp.GradScaler("cpu")`` with ``unscale_`` + clip + ``step`` + ``update``, and
  ``fastradam.torch.GradScaler`` (one read-only pre-pass, no gradient written), with a step whose
  gradient is inf: skipped (nothing written, step counts kept) and the scale backed off as torch's.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import fastradam.torch as ft
from fastradam import StepPlan
from fastradam.reference import join_master
from fastradam.torch import buckets

SHAPES = ((6, 5), (17,), (3,), (4, 4))
GROUPS = ({"weight_decay": 0.1, "decoupled_weight_decay": True}, {"lr": 2e-2, "weight_decay": 0.01})
LR = 1e-2
BETAS = (0.9, 0.99)  # steps 1-5 unrectified (the clip scales the update itself), then rectified
STEPS = 7
NORM_TYPES = (2.0, 1.0, math.inf, 3.0)
#: max_norm as a multiple of the first step's norm (:func:`base_norm`): clipping every step, and never.
MAX_NORMS = {"below": 0.3, "above": 50.0}
#: relative to a tensor's largest entry (test_torch_optimizer.py's figures, for 7 steps)
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-12}
#: 16-bit parameters vs the float32 run: their own rounding, a few units in the last place
SIXTEEN_BIT_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
PATHS = ("gather", "tensors", "views")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "tensors":
        monkeypatch.setattr(buckets, "GATHER_BELOW", 0)  # fresh gradients stepped where they are
    return request.param


def make_params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype))
            for shape in SHAPES]


def groups_of(params):
    return [{"params": params[:2], **GROUPS[0]}, {"params": params[2:], **GROUPS[1]}]


def gradient(p, step, k, scale=1.0):
    generator = torch.Generator().manual_seed(1000 * step + k)
    return (torch.randn(p.shape, generator=generator, dtype=torch.float64) * (0.3 * (k + 1)) * scale).to(p.dtype)


def base_norm(params, norm_type):
    """The norm of the first step's gradients."""
    return float(torch.nn.utils.get_total_norm([gradient(p, 0, k) for k, p in enumerate(params)], norm_type))


def has_grad(step, k):
    return not (k == 2 and step % 3 == 1)  # one parameter skips some steps


def set_grads(optimizer, params, step, path, scale=1.0, fused=True):
    """This step's gradients (times ``scale``), on ``path`` (views only for the drop-in: ``fused``)."""
    if path == "views" and fused:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer.zero_grad(set_to_none=False)  # the gradients become views of the flat gradient buffer
        for k, p in enumerate(params):
            if has_grad(step, k):
                p.grad.copy_(gradient(p, step, k, scale))
            else:
                p.grad = None
        return
    optimizer.zero_grad()
    for k, p in enumerate(params):
        if has_grad(step, k):
            p.grad = gradient(p, step, k, scale)


def assert_close(actual, expected, tolerance, what=""):
    for k, (a, b) in enumerate(zip(actual, expected)):
        a, b = (torch.view_as_real(x.detach()) if x.is_complex() else x.detach().double() for x in (a, b))
        error = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert error <= tolerance, f"{what} tensor {k}: relative difference {error:.3g} > {tolerance:.3g}"


def run_torch(params, max_norm, norm_type, steps=STEPS, source_dtype=None):
    """torch.optim.RAdam + clip_grad_norm_ (max_norm None: no clip); the norms it returned.
    ``source_dtype``: the gradients of a run in that dtype, cast up to the parameters'."""
    optimizer = torch.optim.RAdam(groups_of(params), lr=LR, betas=BETAS, foreach=False)
    norms = []
    for t in range(steps):
        if source_dtype is None:
            set_grads(optimizer, params, t, "gather", fused=False)
        else:  # the 16-bit run's gradients, cast up
            optimizer.zero_grad()
            for k, p in enumerate(params):
                if has_grad(t, k):
                    p.grad = gradient(torch.empty(p.shape, dtype=source_dtype), t, k).to(p.dtype)
        if max_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type))
        optimizer.step()
    return norms


def run_fused(params, max_norm, norm_type, path, steps=STEPS, **options):
    optimizer = ft.RAdam(groups_of(params), lr=LR, betas=BETAS, **options)
    norms = []
    for t in range(steps):
        set_grads(optimizer, params, t, path)
        if max_norm is not None:
            before = [None if p.grad is None else p.grad.clone() for p in params]
            norms.append(optimizer.clip_grad_norm_(max_norm, norm_type))
            assert all((b is None) == (p.grad is None) and (b is None or torch.equal(b, p.grad))
                       for b, p in zip(before, params)), "clip_grad_norm_ wrote a gradient"
        optimizer.step()
    return optimizer, norms


# -- float32 / float64: torch's trajectory and norms -------------------------------------------


@pytest.mark.parametrize("max_norm", list(MAX_NORMS), ids=list(MAX_NORMS))
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=["2", "1", "inf", "3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_clip_matches_torch(dtype, norm_type, max_norm, path):
    reference, fused = make_params(dtype), make_params(dtype)
    max_norm = MAX_NORMS[max_norm] * base_norm(reference, norm_type)
    torch_norms = run_torch(reference, max_norm, norm_type)
    _, norms = run_fused(fused, max_norm, norm_type, path)
    assert_close(fused, reference, TOLERANCE[dtype], "parameters")
    for ours, theirs in zip(norms, torch_norms):
        assert ours.dtype == theirs.dtype and ours.device == theirs.device and ours.shape == ()
        torch.testing.assert_close(ours, theirs, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    clipped = [float(n) > max_norm for n in torch_norms]
    assert all(clipped) if max_norm < base_norm(reference, norm_type) else not any(clipped)


def test_clip_changes_the_trajectory():
    """The clip is applied: unclipped runs are far from the clipped one (so the tests above test it)."""
    clipped, unclipped, fused = make_params(torch.float32), make_params(torch.float32), make_params(torch.float32)
    max_norm = 0.3 * base_norm(clipped, 2.0)
    run_torch(clipped, max_norm, 2.0)
    run_torch(unclipped, None, 2.0)
    run_fused(fused, max_norm, 2.0, "gather")
    assert_close(fused, clipped, TOLERANCE[torch.float32])
    with pytest.raises(AssertionError):
        assert_close(fused, unclipped, 100 * TOLERANCE[torch.float32])


def test_returned_norm_conventions():
    """torch's dtype/device rules for the total: the promoted gradient dtype, the first gradient's
    device; torch.tensor(0.) without gradients; complex gradients' norms are of their magnitudes."""
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    z = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64))
    params = [a, b, c, z]
    optimizer = ft.RAdam(params)
    empty = optimizer.clip_grad_norm_(1.0)
    assert empty.dtype == torch.get_default_dtype() and empty.device.type == "cpu"
    assert torch.equal(empty, torch.nn.utils.clip_grad_norm_(params, 1.0))
    for chosen in ([a, c], [c], [a, b, c], [z], [a, z]):
        for norm_type in (2.0, 1.0, "inf", 3.0):
            for p in params:
                p.grad = torch.randn_like(p) if any(p is q for q in chosen) else None
            ours = optimizer.clip_grad_norm_(1.0, norm_type)
            theirs = torch.nn.utils.clip_grad_norm_(_copies(chosen), 1.0, norm_type)
            assert ours.dtype == theirs.dtype, (chosen, norm_type)
            rtol = 1e-2 if any(p.dtype == torch.bfloat16 for p in chosen) else 1e-6  # (torch's bf16 norms round)
            torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0)


def _copies(params):
    copies = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        copies.append(q)
    return copies


def test_error_if_nonfinite_and_arguments():
    params = make_params(torch.float32)
    optimizer = ft.RAdam(params)
    for k, p in enumerate(params):
        p.grad = gradient(p, 0, k)
    params[1].grad[3] = math.inf
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(_copies(params), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours:
        optimizer.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    assert optimizer._clip_pending is None
    assert math.isinf(optimizer.clip_grad_norm_(1.0, norm_type="inf").item())  # without: the norm, as torch
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_grad_norm"):
            optimizer.clip_grad_norm_(bad)
    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match="norm_type"):
            optimizer.clip_grad_norm_(1.0, norm_type=bad)
    with pytest.raises(TypeError, match="norm_type"):
        optimizer.clip_grad_norm_(1.0, norm_type=None)


def test_nonfinite_norm_without_the_error_steps_as_torch():
    """error_if_nonfinite=False and an inf gradient: torch clips by 0 (inf * 0 = NaN) and steps; so here."""
    reference, fused = make_params(torch.float64), make_params(torch.float64)
    torch_opt = torch.optim.RAdam(groups_of(reference), lr=LR, foreach=False)
    fused_opt = ft.RAdam(groups_of(fused), lr=LR)
    for params, optimizer, clip in ((reference, torch_opt, lambda: torch.nn.utils.clip_grad_norm_(reference, 1.0)),
                                    (fused, fused_opt, lambda: fused_opt.clip_grad_norm_(1.0))):
        for k, p in enumerate(params):
            p.grad = gradient(p, 0, k)
        params[0].grad[0, 0] = math.inf
        clip()
        optimizer.step()
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a.detach(), b.detach(), equal_nan=True, rtol=1e-12, atol=0)


def test_pending_clip_semantics():
    """The clip applies at the next step, to the gradients it saw: zero_grad drops it, a new call
    replaces it, gradients changed in between are refused (nothing written)."""
    params = make_params(torch.float64)
    optimizer = ft.RAdam(groups_of(params), lr=LR)
    set_grads(optimizer, params, 0, "gather")
    optimizer.clip_grad_norm_(1e-3)
    optimizer.zero_grad()
    assert optimizer._clip_pending is None
    reference = make_params(torch.float64)
    run_torch(reference, None, 2.0, steps=1)
    set_grads(optimizer, params, 0, "gather")
    optimizer.step()  # unclipped, as torch's after zero_grad
    assert_close(params, reference, TOLERANCE[torch.float64])

    optimizer.clip_grad_norm_(1e-3)
    for change in ("add", "replace"):
        set_grads(optimizer, params, 1, "gather")
        optimizer.clip_grad_norm_(1e-3, norm_type=1.0)
        if change == "add":
            params[0].grad.add_(1.0)  # e.g. another backward accumulating
        else:
            params[1].grad = params[1].grad.clone()
        before = [p.detach().clone() for p in params] + [b.exp_avg_flat.clone() for b in optimizer._buckets]
        steps = [b.steps.clone() for b in optimizer._buckets]
        with pytest.raises(RuntimeError, match=r"gradients changed after optimizer.clip_grad_norm_\(\)"):
            optimizer.step()
        after = [p.detach() for p in params] + [b.exp_avg_flat for b in optimizer._buckets]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert all(torch.equal(a, b.steps) for a, b in zip(steps, optimizer._buckets))
    optimizer.clip_grad_norm_(1e-3)  # called again: clips the gradients as they are now
    optimizer.step()
    assert optimizer._clip_pending is None


def test_gradient_views_and_fresh_gradients_mixed(path):
    """Some gradients views of the flat gradient buffer, one fresh: gathered (or read in place) as the
    step takes them; the gather bumps the views' shared version counter, and the step still takes them."""
    reference, fused = make_params(torch.float32), make_params(torch.float32)
    run_torch(reference, 0.3, 2.0, steps=3)
    optimizer = ft.RAdam(groups_of(fused), lr=LR, betas=BETAS)
    for t in range(3):
        set_grads(optimizer, fused, t, "views")
        if fused[3].grad is not None:
            fused[3].grad = fused[3].grad.clone()  # no longer a view
        optimizer.clip_grad_norm_(0.3)
        optimizer.step()
    assert_close(fused, reference, TOLERANCE[torch.float32])


def test_gradient_views_of_engine_buffers():
    """Gradients that view some other buffer (DDP's gradient_as_bucket_view) are read where they are."""
    reference, fused = make_params(torch.float64), make_params(torch.float64)
    run_torch(reference, 0.3, 2.0, steps=3)
    optimizer = ft.RAdam(groups_of(fused), lr=LR, betas=BETAS)
    storage = torch.zeros(sum(p.numel() for p in fused) + 7, dtype=torch.float64)
    for t in range(3):
        offset = 7
        for k, p in enumerate(fused):
            view = storage[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            view.copy_(gradient(p, t, k))
            p.grad = view if has_grad(t, k) else None
        optimizer.clip_grad_norm_(0.3)
        optimizer.step()
    assert_close(fused, reference, TOLERANCE[torch.float64])
    assert all(b.grad_flat is None for b in optimizer._buckets)


# -- 16-bit parameters -------------------------------------------------------------------------

KEEPINGS = {
    "plain": {}, "master": {"master_weights": True},
    "remainders": {"master_weights": True, "store_param_remainders": True},
    "stochastic": {"bf16_stochastic_round": True, "stochastic_round_seed": 7},
}


@pytest.mark.parametrize("dtype,keeping", [(torch.bfloat16, k) for k in KEEPINGS]
                         + [(torch.float16, "plain"), (torch.float16, "master")],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_sixteen_bit_matches_float32_torch(dtype, keeping, path):
    """The drop-in's 16-bit steps are float32 math on the gradients cast up: torch's float32 run with
    clip_grad_norm_ on those gradients is the reference (masters to float32 tolerance)."""
    norm_type = 2.0 if keeping != "plain" else math.inf
    fused = make_params(dtype)
    reference = [torch.nn.Parameter(p.detach().float()) for p in fused]
    torch_norms = run_torch(reference, 0.3, norm_type, source_dtype=dtype)
    optimizer, norms = run_fused(fused, 0.3, norm_type, path, **KEEPINGS[keeping])
    for ours, theirs in zip(norms, torch_norms):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=0)
    assert_close(fused, reference, SIXTEEN_BIT_TOLERANCE[dtype], "16-bit parameters")
    if keeping == "stochastic":
        return  # (its bits are keyed by each element's place in the bucket: test_torch_master.py checks them)
    oracle = plan_oracle(dtype, keeping, 0.3, norm_type)
    for k, (p, (params, master, exp_avg, exp_avg_sq)) in enumerate(zip(fused, oracle)):
        # the norms differ in the float64 rounding of their sums only: a coefficient one float32 ulp off
        # at most, so the values to float32 rounding (a 16-bit parameter may round the other way)
        ulp = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
        assert_close([p], [torch.from_numpy(params.astype(np.float32))], ulp, f"16-bit parameter {k}")
        state = optimizer.state[p]
        for name, value in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            assert_close([state[name]], [torch.from_numpy(value.astype(np.float32))], ulp, f"{name} {k}")
        if keeping in ("master", "remainders"):
            mine = state["master_param"]
            if keeping == "remainders":
                mine = torch.from_numpy(join_master(p.detach().view(torch.int16).numpy(), mine.numpy()))
                master = join_master(params.view(np.int16), master)
            assert_close([mine], [torch.from_numpy(master)], 1e-6, f"fp32 master {k}")


def _numpy(t):
    """A CPU tensor's values as NumPy (bfloat16 as ml_dtypes'), a view."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def plan_oracle(dtype, keeping, max_norm, norm_type):
    """Each tensor stepped alone by a StepPlan with the global norm given (grad_norm=, float64 from the
    gradients' values): (params, master or remainders, exp_avg, exp_avg_sq) per tensor."""
    moments = np.float32 if dtype == torch.float16 else ml_dtypes.bfloat16  # the drop-in's moment rule
    tensors = []
    for p in make_params(dtype):
        params = _numpy(p.detach().clone())
        keeper = {"plain": None, "master": params.astype(np.float32),
                  "remainders": np.zeros(params.shape, np.int16)}[keeping]
        tensors.append((params, keeper, np.zeros(params.shape, moments), np.zeros(params.shape, moments)))
    counts = [0] * len(tensors)
    for t in range(STEPS):
        grads = {k: gradient(p, t, k) for k, p in enumerate(make_params(dtype)) if has_grad(t, k)}
        norm = float(torch.nn.utils.get_total_norm([g.double() for g in grads.values()], norm_type))
        for k, g in grads.items():
            params, keeper, exp_avg, exp_avg_sq = tensors[k]
            counts[k] += 1
            options = {"lr": LR, "betas": BETAS, **GROUPS[0 if k < 2 else 1]}
            keeping_argument = {"master": {"master_params": keeper},
                                "remainders": {"param_remainders": keeper}}.get(keeping, {})
            plan = StepPlan(params, _numpy(g), exp_avg, exp_avg_sq, **keeping_argument, **options)
            plan.step(step=counts[k], max_grad_norm=max_norm, norm_type=norm_type, grad_norm=norm)
    return tensors


def test_complex_parameters():
    reference = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex64)), torch.nn.Parameter(torch.randn(4))]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    torch_opt = torch.optim.RAdam(reference, lr=LR, foreach=False)
    fused_opt = ft.RAdam(fused, lr=LR)
    for t, norm_type in enumerate((2.0, 1.0, math.inf, 3.0)):
        for params, optimizer in ((reference, torch_opt), (fused, fused_opt)):
            for k, p in enumerate(params):
                generator = torch.Generator().manual_seed(10 * t + k)
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        theirs = torch.nn.utils.clip_grad_norm_(reference, 0.5, norm_type)
        ours = fused_opt.clip_grad_norm_(0.5, norm_type)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        torch_opt.step()
        fused_opt.step()
    assert_close(fused, reference, 5 * TOLERANCE[torch.float32])


# -- AMP ---------------------------------------------------------------------------------------

SCALERS = {"torch": torch.amp.GradScaler, "fastradam": ft.GradScaler}
INF_STEP = 3
AMP_STEPS = 6


def amp_run(params, optimizer, scaler_class, clip, unscale, max_norm=0.3, norm_type=2.0, path="gather", fused=True,
            checks=None):
    """Scaled gradients (as after ``scaler.scale(loss).backward()``), one inf at INF_STEP; the scales seen."""
    scaler = scaler_class("cpu", init_scale=2.0 ** 12, growth_interval=2)
    scales = []
    for t in range(AMP_STEPS):
        scaler.scale(torch.ones(()))  # (as scaler.scale(loss): the scale made on first use)
        scale = scaler.get_scale()
        scales.append(scale)
        set_grads(optimizer, params, t, path, scale=scale, fused=fused)
        if t == INF_STEP:
            params[1].grad[2] = math.inf
        if unscale:
            scaler.unscale_(optimizer)
        if clip is not None:
            clip(params, optimizer, max_norm, norm_type)
        if checks is not None:
            checks(t, scaler)
        scaler.step(optimizer)
        scaler.update()
    scales.append(scaler.get_scale())
    return scales


def torch_clip(params, optimizer, max_norm, norm_type):
    torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)


def fused_clip(params, optimizer, max_norm, norm_type):
    optimizer.clip_grad_norm_(max_norm, norm_type)


def amp_reference(clip=True, norm_type=2.0):
    params = make_params(torch.float32)
    optimizer = torch.optim.RAdam(groups_of(params), lr=LR, betas=BETAS, foreach=False)
    scales = amp_run(params, optimizer, torch.amp.GradScaler, torch_clip if clip else None, unscale=clip,
                     norm_type=norm_type, fused=False)
    return params, optimizer, scales


@pytest.mark.parametrize("norm_type", [2.0, 1.0], ids=["2", "1"])
@pytest.mark.parametrize("scaler", list(SCALERS))
def test_grad_scaler_unscale_clip_step(scaler, norm_type, path):
    """unscale_ + optimizer.clip_grad_norm_ + scaler.step + update, an inf step skipped: torch's result."""
    reference, torch_opt, torch_scales = amp_reference(norm_type=norm_type)
    assert torch_scales[INF_STEP + 1] == torch_scales[INF_STEP] / 2  # backed off
    params = make_params(torch.float32)
    optimizer = ft.RAdam(groups_of(params), lr=LR, betas=BETAS)
    seen = {}

    def checks(t, scaler_):
        seen[t] = [b.steps.clone() for b in optimizer._buckets] + [b.exp_avg_flat.clone() for b in optimizer._buckets]
        if scaler == "fastradam":  # nothing written: the gradients keep their scaled values
            for k, p in enumerate(params):
                if p.grad is not None and t != INF_STEP:
                    assert torch.equal(p.grad, gradient(p, t, k, torch_scales[t]))

    scales = amp_run(params, optimizer, SCALERS[scaler], fused_clip, unscale=True, norm_type=norm_type, path=path,
                     checks=checks)
    assert scales == torch_scales
    assert_close(params, reference, 5 * TOLERANCE[torch.float32])
    for p, q in zip(params, reference):  # the inf step counted for none
        assert float(optimizer.state[p]["step"]) == float(torch_opt.state[q]["step"]) < AMP_STEPS
    # the skipped step wrote nothing: the state before INF_STEP + 1's step is the one before INF_STEP's
    after = [b.steps for b in optimizer._buckets] + [b.exp_avg_flat for b in optimizer._buckets]
    assert not all(torch.equal(a, b) for a, b in zip(seen[INF_STEP], after))
    assert all(torch.equal(a, b) for a, b in zip(seen[INF_STEP], seen[INF_STEP + 1]))


@pytest.mark.parametrize("scaler", list(SCALERS))
def test_grad_scaler_step_without_unscale(scaler, path):
    """scaler.step alone (no clip): the scale is divided out inside the step (torch's fused-optimizer
    contract, or the subclass's pre-pass), the inf step skipped."""
    reference, _, torch_scales = amp_reference(clip=False)
    params = make_params(torch.float32)
    optimizer = ft.RAdam(groups_of(params), lr=LR, betas=BETAS)
    scales = amp_run(params, optimizer, SCALERS[scaler], None, unscale=False, path=path)
    assert scales == torch_scales
    assert_close(params, reference, 5 * TOLERANCE[torch.float32])


def test_fastradam_scaler_makes_one_pre_pass(monkeypatch):
    """unscale_ + clip_grad_norm_ (2-norm) + step: one pre-pass (the unscale's norm is reused); another
    norm type makes its own; the pre-pass reads only."""
    calls = []
    original = buckets.FlatBucket.grad_norms

    def counting(self, *args, **kwargs):
        calls.append(args[3])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(buckets.FlatBucket, "grad_norms", counting)
    params = make_params(torch.float32)
    optimizer = ft.RAdam(groups_of(params), lr=LR)
    scaler = ft.GradScaler("cpu", init_scale=256.0)
    for norm_type, expected in ((2.0, [2.0]), (1.0, [2.0, 1.0])):
        calls.clear()
        scaler.scale(torch.ones(()))
        set_grads(optimizer, params, 0, "gather", scale=256.0)
        scaler.unscale_(optimizer)
        total = optimizer.clip_grad_norm_(1.0, norm_type)
        expected_total = torch.nn.utils.get_total_norm([p.grad / 256.0 for p in params], norm_type)
        torch.testing.assert_close(total, expected_total, rtol=1e-6, atol=0)
        scaler.step(optimizer)
        scaler.update()
        assert calls == expected
        assert optimizer._unscaled is None and optimizer._clip_pending is None


def test_fastradam_scaler_float16_parameters():
    """torch's unscale_ refuses float16 gradients ("Attempting to unscale FP16 gradients."); the subclass
    writes none, so float16 parameters train under it (vs torch's float32 run, float16 tolerance)."""
    params = make_params(torch.float16)
    with pytest.raises(ValueError, match="FP16"):
        scaler = torch.amp.GradScaler("cpu")
        optimizer = ft.RAdam(params)
        for k, p in enumerate(params):
            p.grad = gradient(p, 0, k)
        scaler.scale(torch.ones(()))
        scaler.unscale_(optimizer)
    reference = [torch.nn.Parameter(p.detach().float()) for p in params]
    run_torch(reference, 0.3, 2.0, steps=4, source_dtype=torch.float16)
    optimizer = ft.RAdam(groups_of(params), lr=LR, betas=BETAS)
    scaler = ft.GradScaler("cpu", init_scale=64.0, growth_interval=100)
    for t in range(4):
        scaler.scale(torch.ones(()))
        set_grads(optimizer, params, t, "gather", scale=64.0)  # exact: a power of 2
        scaler.unscale_(optimizer)
        optimizer.clip_grad_norm_(0.3)
        scaler.step(optimizer)
        scaler.update()
    assert_close(params, reference, SIXTEEN_BIT_TOLERANCE[torch.float16])


def test_fastradam_scaler_refuses_torch_clip_after_unscale():
    """After the subclass's unscale_ the gradients are still scaled: torch's clip_grad_norm_ on them
    (it multiplies them in place) is caught at the step, before anything is written."""
    params = make_params(torch.float32)
    optimizer = ft.RAdam(params)
    scaler = ft.GradScaler("cpu", init_scale=256.0)
    scaler.scale(torch.ones(()))
    for k, p in enumerate(params):
        p.grad = gradient(p, 0, k, 256.0)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="not torch.nn.utils.clip_grad_norm_"):
        scaler.step(optimizer)
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and not optimizer.state


def test_grad_scaler_with_another_optimizer_is_torchs():
    """fastradam.torch.GradScaler with torch.optim.RAdam: torch's unscale_ (it writes the gradients)."""
    params = make_params(torch.float32)
    optimizer = torch.optim.RAdam(params)
    scaler = ft.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    for k, p in enumerate(params):
        p.grad = gradient(p, 0, k, 4.0)
    scaler.unscale_(optimizer)
    for k, p in enumerate(params):
        assert torch.equal(p.grad, gradient(p, 0, k, 4.0) / 4.0)
    scaler.step(optimizer)
    scaler.update()


def test_grad_scaler_pickles_and_state_dict():
    import pickle

    scaler = ft.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    params = make_params(torch.float32)
    optimizer = ft.RAdam(params)
    for k, p in enumerate(params):
        p.grad = gradient(p, 0, k, 8.0)
    scaler.step(optimizer)
    scaler.update()
    copy = pickle.loads(pickle.dumps(scaler))
    assert isinstance(copy, ft.GradScaler) and copy.state_dict() == scaler.state_dict()
    torch.amp.GradScaler("cpu").load_state_dict(scaler.state_dict())
