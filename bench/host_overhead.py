"""Host time per call of each entry point, paired round-robin against torch's fused Adam.

A step on a small buffer is bound by the Python between the call and the launch (validation,
scalars, argument packing). Each round times a batch of calls of every case in turn, so the
VM's drift cancels in the per-round ratios; the output gives each case's median time per call
and its median ratio to torch's fused Adam on the same tensors (``< 1``: faster). The CPU cases:

- ``fused_step`` (a one-shot call: validation, scalars, launch) and a bound ``StepPlan.step`` on
  4096 float32 elements, against ``torch.optim.Adam(fused=True)`` on one 4096-element tensor;
- ``fastradam.torch.RAdam.step`` on a 6-tensor 0.1M MLP and a 72-tensor 4.7M transformer
  encoder, with fresh gradients (torch's default ``zero_grad()``) and with gradient views
  (``zero_grad(set_to_none=False)``), against torch's fused Adam on the same model.

With a GPU the CUDA cases are added (the bare CuPy launch of the same kernel is the floor).
``--profile`` prints where the time of the one-shot call goes (cProfile, top functions by own time).

Usage: ``python bench/host_overhead.py [--rounds 30] [--profile]``
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Callable

import numpy as np

import fastradam
import fastradam.torch

N = 4096
TENSORS = 64
MLP = (64, 256, 256, 64)  #: layer widths: 3 Linear layers, 6 tensors, 98,880 parameters
ENCODER = {"d_model": 256, "nhead": 4, "dim_feedforward": 1024, "num_layers": 6}  #: 72 tensors, 4.74M


def _model_steps(name: str, model, device: str = "cpu") -> dict[str, Callable[[], None]]:
    """fastradam.torch.RAdam (fresh gradients, gradient views) and torch's fused Adam, each on its
    own copy of ``model`` (the drop-in makes its parameters views of its flat buffers)."""
    import copy

    import torch

    copies = [copy.deepcopy(model).to(device) for _ in range(3)]
    params = [list(m.parameters()) for m in copies]
    grads = [torch.randn_like(p) for p in params[0]]
    label = f"{name} ({len(grads)} tensors, {sum(g.numel() for g in grads) / 1e6:.2f}M)"
    optimizers = [torch.optim.Adam(params[0], lr=1e-3, fused=True), fastradam.torch.RAdam(params[1], lr=1e-3),
                  fastradam.torch.RAdam(params[2], lr=1e-3)]
    for group, optimizer in zip(params, optimizers):
        for p, g in zip(group, grads):
            p.grad = g.clone()
        optimizer.step()
    fresh = [g.clone() for g in grads]

    def fresh_step() -> None:  # the gradients autograd leaves after torch's default zero_grad()
        for p, g in zip(params[1], fresh):
            p.grad = g
        optimizers[1].step()

    optimizers[2].zero_grad(set_to_none=False)  # gradients become views of one flat buffer
    torch._foreach_copy_([p.grad for p in params[2]], grads)
    return {f"{label}: torch fused Adam": optimizers[0].step,
            f"{label}: fastradam.torch.RAdam, fresh grads": fresh_step,
            f"{label}: fastradam.torch.RAdam, grad views": optimizers[2].step}


def cpu_cases() -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """The CPU cases, and for each the torch fused Adam case it is paired with."""
    import torch

    rng = np.random.default_rng(0)
    flat = [rng.standard_normal(N, dtype=np.float32) for _ in range(3)] + [rng.random(N, dtype=np.float32)]
    plan = fastradam.StepPlan(*flat)
    param = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(N, dtype=np.float32)))
    param.grad = torch.from_numpy(rng.standard_normal(N, dtype=np.float32))
    adam = torch.optim.Adam([param], fused=True)
    adam.step()
    peer = f"torch fused Adam, one {N}-element tensor"
    cases = {peer: adam.step,
             f"fused_step, flat fp32 N={N}": lambda: fastradam.fused_step(*flat, step=10),
             f"StepPlan.step, flat fp32 N={N}": lambda: plan.step(step=10)}
    pairs = {name: peer for name in cases if name != peer}
    widths = MLP
    mlp = torch.nn.Sequential(*(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])))
    layer = torch.nn.TransformerEncoderLayer(ENCODER["d_model"], ENCODER["nhead"], ENCODER["dim_feedforward"])
    encoder = torch.nn.TransformerEncoder(layer, ENCODER["num_layers"], enable_nested_tensor=False)
    for name, model in (("MLP", mlp), ("transformer encoder", encoder)):
        steps = _model_steps(name, model)
        peer = next(case for case in steps if case.endswith("torch fused Adam"))
        cases.update(steps)
        pairs.update({case: peer for case in steps if case != peer})
    return cases, pairs


def cuda_cases() -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """The CUDA cases (host time: each round synchronises once at its end), paired with the bare launch."""
    import cupy
    import torch

    from fastradam.backends import cuda
    from fastradam.backends.cuda import launch, module
    from fastradam.scalars import pack_rows, step_scalars

    rng = cupy.random.default_rng(0)
    flat = [rng.standard_normal(N, dtype=np.float32) for _ in range(3)] + [rng.random(N, dtype=np.float32)]
    tensors = [torch.from_dlpack(a) for a in flat]
    bf16 = [tensors[0].bfloat16(), tensors[1].bfloat16(), tensors[2].clone(), tensors[3].clone()]
    layout = fastradam.FlatLayout([(N // TENSORS,)] * TENSORS)
    lists = [[a[i * (N // TENSORS):(i + 1) * (N // TENSORS)] for i in range(TENSORS)] for a in flat]
    steps = np.full(TENSORS, 10)

    storage = cuda.storage_of_arrays(flat[0], flat[1], flat[2])
    kernel = module._kernel(0, storage, cuda.kernel_name("step", storage))
    floats, ints = pack_rows([step_scalars(step=10, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                           decoupled_weight_decay=False, maximize=False)], np.dtype(np.float32))
    launch_args = launch.step(flat, None, N, launch.scalars_record(floats, ints), launch.NO_FLAG)
    grid = module._grid(N, module.lanes(storage), 0)
    plan = fastradam.StepPlan(*flat)
    floor = "bare CuPy launch (floor)"
    cases = {
        floor: lambda: kernel((grid,), (cuda.BLOCK,), launch_args),
        "cupy flat fp32": lambda: fastradam.fused_step(*flat, step=10),
        "cupy flat fp32, StepPlan.step": lambda: plan.step(step=10),
        "cupy flat fp32 check_finite": lambda: fastradam.fused_step(*flat, step=10, check_finite=True),
        "torch flat fp32": lambda: fastradam.fused_step(*tensors, step=10),
        "torch flat bf16/bf16/fp32": lambda: fastradam.fused_step(*bf16, step=10),
        f"cupy layout {TENSORS} segments": lambda: fastradam.fused_step_layout(layout, *flat, steps=steps),
        f"cupy multi {TENSORS} tensors": lambda: fastradam.fused_step_multi(*lists, steps=steps),
    }
    return cases, {name: floor for name in cases if name != floor}


def paired(cases: dict[str, Callable[[], None]], rounds: int, calls: int,
           sync: Callable[[], None]) -> dict[str, np.ndarray]:
    """Per-call seconds of every case in each of ``rounds`` rounds (cases in turn within a round)."""
    for step in cases.values():  # warm up (compiles, caches, first-touch)
        for _ in range(10):
            step()
    sync()
    times = {name: np.zeros(rounds) for name in cases}
    for r in range(rounds):
        for name, step in cases.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            sync()
            times[name][r] = (time.perf_counter() - start) / calls
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=50, help="calls per case per round")
    parser.add_argument("--profile", action="store_true", help="cProfile the one-shot flat call")
    args = parser.parse_args()
    cases, pairs = cpu_cases()
    sync = lambda: None  # noqa: E731
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount():
            more, more_pairs = cuda_cases()
            cases.update(more)
            pairs.update(more_pairs)
            sync = cupy.cuda.Device().synchronize
    except Exception as error:  # no CuPy, no driver or no device: CPU cases only
        print(f"(CUDA cases skipped: {type(error).__name__}: {error})")
    times = paired(cases, args.rounds, args.calls, sync)
    print(f"host time per call, median of {args.rounds} paired rounds x {args.calls} calls; "
          "ratio: median of the per-round ratios to the case it is paired with")
    for name, seconds in times.items():
        peer = pairs.get(name)
        ratio = "" if peer is None else f"  {np.median(seconds / times[peer]):5.2f}x {peer}"
        print(f"  {name:<66} {1e6 * np.median(seconds):9.1f} us{ratio}")
    if args.profile:
        name = f"fused_step, flat fp32 N={N}"
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [cases[name]() for _ in range(2000)])
        print(f"\n== {name}: top functions by own time over 2000 calls")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
