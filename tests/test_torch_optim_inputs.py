"""torch's own RAdam test inputs against the drop-in: ``fastradam.torch.RAdam`` vs ``torch.optim.RAdam``.

``torch.testing._internal.common_optimizers`` (shipped in the torch wheel; its import needs the
``expecttest`` test dependency) holds RAdam's ``OptimizerInfo`` in ``optim_db``:

- ``optim_inputs_func``: the keyword configurations torch's optimizer tests train with (6 on the
  CPU; 4 more, all ``capturable=True``, on CUDA). Each is trained here, side by side with
  ``torch.optim.RAdam``, as given and with the flags torch's tests add (``foreach=False``,
  ``foreach=True``, a tensor ``lr``; ``differentiable=True``), on a few tensors of odd shapes (a
  0-d one among them, one that skips some steps without a gradient, one whose state appears late),
  15 steps of the same gradients. Parameters are compared after every step, ``state_dict()``
  (entries, dtypes, step counts, param groups) at the end.
- ``optim_error_inputs_func``: the error cases with the exception type and message regex torch's
  ``test_errors`` expects, checked the way that test checks them.

Tolerance: fastradam folds each step's scalars (bias corrections, rectification, lr) in float64 and
casts them once, torch computes them op by op, so the results agree to rounding, not bit for bit:
float32 ``rtol=2e-6, atol=1e-7``, float64 ``rtol=1e-12, atol=1e-14``. Measured over every CPU case
(elements of magnitude >= 1e-2, relative; all elements, absolute): float32 parameters 1e-7 / 3e-8,
``exp_avg`` 9.7e-7 / 6e-8, ``exp_avg_sq`` 2e-7 / 3.7e-9; float64 parameters 1.4e-16 / 6.9e-18,
``exp_avg`` 4.2e-15 / 1.1e-16, ``exp_avg_sq`` 2.7e-16 / 6.9e-18. Step counts are compared exactly.

Deliberate refusals, each an ``xfail(strict=True)`` with the exception it raises, and each message
checked to say what to do instead (:func:`test_refusals_say_what_to_do_instead`):
``differentiable=True`` (NotImplementedError: use torch.optim.RAdam) and a parameter listed twice in
one group (ValueError where torch warns and steps it twice: list it once). ``capturable=True`` on the
CPU is refused by both optimizers (torch at the first step, the drop-in at construction) and is
tested as such; the ``capturable`` configurations train on CUDA (``gpu`` tests).
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch

import fastradam.torch as ft


def _common_optimizers():
    """The module, imported without leaving its import's global settings behind: it freezes
    ``torch.backends`` flags (``disable_global_flags``), sets ``TORCHINDUCTOR_CACHE_DIR`` and adds
    warning filters, none of which the rest of the suite should inherit."""
    frozen = torch.backends.flags_frozen()
    inductor_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        with warnings.catch_warnings():
            from torch.testing._internal import common_optimizers
    finally:
        if not frozen:
            setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)
        if inductor_cache is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return common_optimizers


try:
    _co = _common_optimizers()
except Exception as error:  # noqa: BLE001 - any failure of torch's private test module: skip, saying why
    pytest.skip(f"torch.testing._internal.common_optimizers does not import ({type(error).__name__}: {error}); "
                "pip install expecttest (the [test] extra has it)", allow_module_level=True)

RADAM_INFO = next(info for info in _co.optim_db if info.optim_cls is torch.optim.RAdam)
CPU_INPUTS = RADAM_INFO.optim_inputs_func(device="cpu")
CUDA_INPUTS = RADAM_INFO.optim_inputs_func(device="cuda")  # no CUDA call: the CPU ones + 4 capturable
CUDA_ONLY = [oi for oi in CUDA_INPUTS if oi.desc not in {c.desc for c in CPU_INPUTS}]
ERROR_INPUTS = RADAM_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)

STEPS = 15
SHAPES = [(3, 5), (), (7,), (2, 3, 4), (1, 1)]
TOLERANCE = {torch.float32: {"rtol": 2e-6, "atol": 1e-7}, torch.float64: {"rtol": 1e-12, "atol": 1e-14}}

DIFFERENTIABLE = pytest.mark.xfail(strict=True, raises=NotImplementedError,
                                   reason="deliberate: fastradam.torch.RAdam refuses differentiable=True "
                                          "(use torch.optim.RAdam for a differentiable step)")
DUPLICATE = pytest.mark.xfail(strict=True, raises=ValueError,
                              reason="deliberate: a parameter listed twice in one group is refused (ValueError) "
                                     "where torch.optim.RAdam warns and steps it twice; list each parameter once")


def _variants(optim_input):
    """(id, kwargs) of one configuration: as given, and with the flags torch's tests add."""
    kwargs = optim_input.kwargs
    lr = kwargs.get("lr", 1e-3)
    yield optim_input.desc, dict(kwargs)
    yield f"{optim_input.desc}, foreach=False", {**kwargs, "foreach": False}
    yield f"{optim_input.desc}, foreach=True", {**kwargs, "foreach": True}
    if not isinstance(lr, torch.Tensor):
        yield f"{optim_input.desc}, tensor lr", {**kwargs, "lr": torch.tensor(lr)}


def _lr_in(kwargs, dtype):
    """A host tensor lr in the parameters' dtype (see :func:`test_a_float32_tensor_lr_on_float64_parameters`)."""
    lr = kwargs.get("lr")
    return {**kwargs, "lr": lr.to(dtype)} if isinstance(lr, torch.Tensor) else kwargs


CPU_CASES = [pytest.param(_lr_in(kwargs, dtype), dtype, id=f"{desc} [{str(dtype)[6:]}]")
             for optim_input in CPU_INPUTS for desc, kwargs in _variants(optim_input)
             for dtype in (torch.float32, torch.float64)]
CPU_CASES += [pytest.param({**optim_input.kwargs, "differentiable": True}, torch.float32,
                           id=f"{optim_input.desc}, differentiable=True [float32]", marks=DIFFERENTIABLE)
              for optim_input in CPU_INPUTS]
CUDA_CASES = [pytest.param(dict(optim_input.kwargs), torch.float32, id=optim_input.desc) for optim_input in CUDA_INPUTS]


def _make_params(dtype, device):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype).to(device) for shape in SHAPES]


def _gradients(dtype, device):
    """Per step, one gradient (or None: no gradient, the parameter skips that step) per parameter:
    the 0-d one skips every fourth step, the last one has none for its first three steps."""
    generator = torch.Generator().manual_seed(1)
    steps = []
    for step in range(STEPS):
        grads = [torch.randn(shape, generator=generator, dtype=dtype).to(device) for shape in SHAPES]
        if step % 4 == 2:
            grads[1] = None
        if step < 3:
            grads[-1] = None
        steps.append(grads)
    return steps


def _on(kwargs, device):
    lr = kwargs.get("lr")
    return {**kwargs, "lr": lr.to(device)} if isinstance(lr, torch.Tensor) and kwargs.get("capturable") else kwargs


def _assert_same_group(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(ours[key], torch.Tensor) and torch.equal(ours[key].cpu(), value.cpu()), key
        else:
            assert ours[key] == value, key


def _assert_same_state_dict(ours, theirs, tolerance):
    assert ours.keys() == theirs.keys()
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for our_group, their_group in zip(ours["param_groups"], theirs["param_groups"]):
        _assert_same_group(our_group, their_group)
    assert ours["state"].keys() == theirs["state"].keys()
    for key, entry in theirs["state"].items():
        our_entry = ours["state"][key]
        assert our_entry.keys() == entry.keys(), key
        for name, value in entry.items():
            ours_value = our_entry[name]
            assert (ours_value.dtype, ours_value.device, ours_value.shape) == (value.dtype, value.device, value.shape)
            if name == "step":
                assert torch.equal(ours_value, value), (key, ours_value, value)
            else:
                torch.testing.assert_close(ours_value, value, **tolerance, msg=lambda m: f"state[{key}][{name}]: {m}")


def _train_side_by_side(kwargs, dtype, device, their_kwargs=None, tolerance=None):
    """Both optimizers trained on the same gradients (torch's with ``their_kwargs`` where given),
    parameters compared after every step, state dicts at the end."""
    initial = _make_params(dtype, device)
    ours = [torch.nn.Parameter(t.clone()) for t in initial]
    theirs = [torch.nn.Parameter(t.clone()) for t in initial]
    kwargs = _on(kwargs, device)
    our_optimizer = ft.RAdam(ours, **kwargs)
    their_optimizer = torch.optim.RAdam(theirs, **(kwargs if their_kwargs is None else their_kwargs))
    tolerance = tolerance or TOLERANCE[dtype]
    for step, grads in enumerate(_gradients(dtype, device)):
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
        our_optimizer.step()
        their_optimizer.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(p.detach(), q.detach(), **tolerance,
                                       msg=lambda m: f"step {step + 1}, parameter {i} {SHAPES[i]}: {m}")
    if their_kwargs is None:
        _assert_same_state_dict(our_optimizer.state_dict(), their_optimizer.state_dict(), tolerance)


@pytest.mark.parametrize("kwargs,dtype", CPU_CASES)
def test_cpu_configuration_trains_as_torch(kwargs, dtype):
    _train_side_by_side(kwargs, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs,dtype", CUDA_CASES)
def test_cuda_configuration_trains_as_torch(kwargs, dtype):
    _train_side_by_side(kwargs, dtype, "cuda")


def test_a_float32_tensor_lr_on_float64_parameters():
    """A known difference, of rounding: with a float32 tensor lr (``torch.tensor(1e-3)``, as torch's
    inputs give it) on float64 parameters, torch computes the decoupled decay factor
    ``1 - lr * weight_decay`` in the tensor's float32 (an error of ~1e-8 relative per step);
    fastradam reads the lr as a number (the float32 value, exactly) and computes in float64, as
    torch does for that lr given as a float. So the drop-in matches torch with ``lr=float(lr)`` to
    float64 rounding, and torch with the float32 tensor to float32 rounding."""
    kwargs = {"weight_decay": 0.1, "decoupled_weight_decay": True, "lr": torch.tensor(1e-3)}
    _train_side_by_side(kwargs, torch.float64, "cpu", their_kwargs={**kwargs, "lr": float(kwargs["lr"])})
    _train_side_by_side(kwargs, torch.float64, "cpu", their_kwargs=kwargs, tolerance=TOLERANCE[torch.float32])
    with pytest.raises(AssertionError, match="not close"):
        _train_side_by_side(kwargs, torch.float64, "cpu", their_kwargs=kwargs)


@pytest.mark.parametrize("kwargs", [pytest.param(dict(oi.kwargs), id=oi.desc) for oi in CUDA_ONLY])
def test_capturable_on_the_cpu_is_refused_by_both(kwargs):
    """torch's CUDA-only configurations on the CPU: torch refuses them at the first step, the
    drop-in at construction, saying what to do."""
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"capturable=True needs CUDA parameters.*move the parameters to CUDA"):
        ft.RAdam([p], **kwargs)
    their_optimizer = torch.optim.RAdam([p], **kwargs)
    p.grad = torch.ones(3)
    with pytest.raises(AssertionError, match="capturable=True, params and state_steps must be on supported devices"):
        their_optimizer.step()


def test_fused_is_no_option_of_either():
    """RAdam's OptimizerInfo has ``supports_fused_on=()``: ``fused`` is not an argument of either."""
    for optimizer_class in (torch.optim.RAdam, ft.RAdam):
        with pytest.raises(TypeError, match="unexpected keyword argument 'fused'"):
            optimizer_class([torch.nn.Parameter(torch.ones(3))], fused=True)


def _error_case(error_input):
    optim_input = error_input.optimizer_error_input
    marks = [DUPLICATE] if issubclass(error_input.error_type, Warning) and "duplicate" in optim_input.desc else []
    return pytest.param(error_input, id=optim_input.desc, marks=marks)


@pytest.mark.parametrize("error_input", [_error_case(e) for e in ERROR_INPUTS])
def test_error_input_raises_as_torch(error_input):
    """As torch's ``test_errors``: the error (or warning) type and message regex, at construction or at
    the first step; torch.optim.RAdam is held to it too, so a changed torch shows here first."""
    optim_input = error_input.optimizer_error_input
    for optimizer_class in (torch.optim.RAdam, ft.RAdam):
        if issubclass(error_input.error_type, Warning):
            expect = pytest.warns(error_input.error_type, match=error_input.error_regex)
        else:
            expect = pytest.raises(error_input.error_type, match=error_input.error_regex)
        if error_input.error_on == _co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with expect:
                optimizer_class(optim_input.params, **optim_input.kwargs)
        else:
            optimizer = optimizer_class(optim_input.params, **optim_input.kwargs)
            with expect:
                optimizer.step()


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("kwargs,params,error,match", [
    pytest.param({"differentiable": True}, None, NotImplementedError,
                 r"does not support differentiable=True \(use torch.optim.RAdam for a differentiable step\)",
                 id="differentiable"),
    pytest.param({}, "twice", ValueError, r"duplicate parameters.*list each parameter once", id="duplicate"),
])
def test_refusals_say_what_to_do_instead(kwargs, params, error, match):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(error, match=match):
        ft.RAdam([p, p] if params == "twice" else [p], **kwargs)


@pytest.mark.parametrize("kwargs,words", [
    ({"lr": -1.0}, "Invalid learning rate: -1.0"),
    ({"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
    ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
])
def test_other_bad_options_use_torchs_words(kwargs, words):
    """The values torch's constructor refuses beyond its error inputs: its words first, then fastradam's."""
    for optimizer_class in (torch.optim.RAdam, ft.RAdam):
        with pytest.raises(ValueError, match=re.escape(words)):
            optimizer_class([torch.nn.Parameter(torch.ones(3))], **kwargs)
