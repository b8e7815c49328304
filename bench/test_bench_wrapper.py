"""The PyTorch drop-in, ``fastradam.torch.RAdam.step()``, on a model of many tensors, beside torch's optimizers.

16M float32 parameters (2^24, like the flat 16M cases) as 200 tensors of ~84K, gradients set,
state past the RAdam threshold. ``fastradam_torch`` has its gradients as views of the flat
gradient buffer (after ``zero_grad(set_to_none=False)``: one layout launch, no copy);
``fastradam_torch_fresh_grads`` has separate gradient tensors, as autograd leaves them after
torch's default ``zero_grad()`` (the tensor-list launch on the CPU; on CUDA the wrapper gathers
them into the flat gradient buffer first); ``fastradam_torch_copy_grads`` copies such fresh
gradients into the flat buffer by hand and then takes the layout launch (on the CPU, the
design alternative, for the record). Peers: torch.optim.RAdam foreach and loop, torch.optim.Adam fused.
The CUDA cases (marked ``gpu``, run by ``bench/gpu_check.sh``) synchronise after each step, so
they include the host time; on CUDA, ``fastradam_torch_capturable`` is ``capturable=True`` (step
counts on the device, one launch reading them there) with gradient views.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastradam.torch as fastradam_torch
from fastradam.bench.machine import cpu_model
from peers import STEADY_STEP, torch_optimizer_step

COUNT = 200
N = 1 << 24
IMPLEMENTATIONS = ("fastradam_torch", "fastradam_torch_fresh_grads", "fastradam_torch_copy_grads",
                   "torch_radam_foreach", "torch_radam_loop", "torch_adam_fused")


def _sizes(count: int = COUNT, n: int = N) -> list[int]:
    """``count`` tensor sizes summing to ``n``: equal ones, the remainder on the last."""
    base = n // count
    return [base] * (count - 1) + [n - base * (count - 1)]


def _tensors(dtype=np.float32):
    rng = np.random.default_rng(COUNT)
    return [(rng.standard_normal(size, dtype=dtype), rng.standard_normal(size, dtype=dtype),
             rng.standard_normal(size, dtype=dtype) * dtype(0.1), rng.random(size, dtype=dtype))
            for size in _sizes()]


def wrapper_step(implementation: str, tensors, device: str = "cpu"):
    """A zero-argument ``fastradam.torch.RAdam.step`` on ``tensors`` (p, g, m, v quadruples), at STEADY_STEP."""
    import torch

    parameters = [torch.nn.Parameter(torch.from_numpy(p.copy()).to(device)) for p, _, _, _ in tensors]
    grads = [torch.from_numpy(g).to(device) for _, g, _, _ in tensors]
    optimizer = fastradam_torch.RAdam(parameters, lr=1e-3, capturable=implementation.endswith("capturable"))
    for parameter, grad in zip(parameters, grads):
        parameter.grad = grad.clone()
    optimizer.step()  # creates the state (and compiles)
    for parameter, (_, _, exp_avg, exp_avg_sq) in zip(parameters, tensors):
        state = optimizer.state[parameter]
        state["exp_avg"].copy_(torch.from_numpy(exp_avg))
        state["exp_avg_sq"].copy_(torch.from_numpy(exp_avg_sq))
        state["step"].fill_(STEADY_STEP)
    if implementation in ("fastradam_torch", "fastradam_torch_capturable"):
        optimizer.zero_grad(set_to_none=False)
        torch._foreach_copy_([p.grad for p in parameters], grads)
        return optimizer.step
    if implementation == "fastradam_torch_copy_grads":
        optimizer.zero_grad(set_to_none=False)
        views = [p.grad for p in parameters]

        def copy_then_step():
            torch._foreach_copy_(views, grads)
            optimizer.step()
        return copy_then_step
    return optimizer.step


def _make_step(implementation: str, tensors, device: str = "cpu"):
    if implementation.startswith("fastradam"):
        return wrapper_step(implementation, tensors, device)
    import torch

    return torch_optimizer_step(implementation, tensors,
                                to_tensor=lambda a: torch.from_numpy(a).to(device))


#: The default (core) subset; the rest runs with ``--full``.
CORE = ("fastradam_torch", "torch_adam_fused", "torch_radam_foreach")


def _cases():
    return [pytest.param(implementation, marks=[] if implementation in CORE else [pytest.mark.full],
                         id=implementation) for implementation in IMPLEMENTATIONS]


def _record(benchmark, implementation: str, device: str) -> None:
    benchmark.group = f"float32 N=16M as {COUNT} tensors, torch API, {device.split(':')[0]}"
    benchmark.extra_info.update(implementation=implementation, n=N, dtype="float32", device=device,
                                bytes_per_element=28, tensors=f"{COUNT} tensors")


@pytest.mark.parametrize("implementation", _cases())
def test_wrapper_step_cpu(benchmark, implementation):
    step = _make_step(implementation, _tensors())
    _record(benchmark, implementation, f"cpu: {cpu_model()}")
    slow = implementation.startswith("torch_radam")
    benchmark.pedantic(step, rounds=5 if slow else 30, warmup_rounds=1)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", [i for i in IMPLEMENTATIONS if i != "torch_radam_loop"]
                         + ["fastradam_torch_capturable"])
def test_wrapper_step_cuda(benchmark, implementation):
    import torch

    step = _make_step(implementation, _tensors(), "cuda")

    def synchronized_step():
        step()
        torch.cuda.synchronize()

    _record(benchmark, implementation, f"gpu: {torch.cuda.get_device_name()}")
    benchmark.pedantic(synchronized_step, rounds=50, warmup_rounds=20)  # clocks up before the first case
