"""Paired timing of the whole optimizer phase with gradient clipping, fastradam against torch.

Cases, each timed round-robin with its peers and the same-traffic kernels (:mod:`paired`'s method):

- ``clip``: ``StepPlan.step(max_grad_norm=...)`` (a read-only norm pre-pass + the step: 4 + 28 B per
  fp32 element) against ``torch.nn.utils.clip_grad_norm_(foreach=True)`` + ``torch.optim.Adam(fused=True)``
  (the norm read, the scale pass and the step: 4 + 8 + 28 = 40 B).
- ``amp``: the same with a loss scale: fastradam folds the unscale into both passes (32 B); torch runs
  ``GradScaler.unscale_`` (a read and write of the gradients), ``clip_grad_norm_``, ``scaler.step`` with
  fused Adam and ``scaler.update`` (48 B).

The same-traffic kernel of fastradam's bytes is the read-only pass plus the step's
(:mod:`roofline`); the share is its time over fastradam's. The clip coefficient is < 1 at every
step (``max_norm`` below the norm), so every pass does its full work.

Usage: ``python bench/clip_paired.py [--n 16777216 67108864] [--rounds 20]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fastradam
from peers import STEADY_STEP
from roofline import same_traffic_read, same_traffic_step

MAX_NORM = 1.0
LOSS_SCALE = 1024.0
#: Bytes per fp32 element of each path.
BYTES = {"fastradam": 32, "torch_clip": 40, "torch_amp": 48}


def _time(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _buffers(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n, dtype=np.float32) for _ in range(3)] + [rng.random(n, dtype=np.float32)]


def _ours(buffers: list[np.ndarray], grad_scale: float):
    plan = fastradam.StepPlan(*buffers, lr=1e-3)
    return lambda: plan.step(step=STEADY_STEP, max_grad_norm=MAX_NORM, grad_scale=grad_scale)


def _torch(buffers: list[np.ndarray], amp: bool):
    params, grads, exp_avg, exp_avg_sq = (torch.from_numpy(b.copy()) for b in buffers)
    parameter = torch.nn.Parameter(params)
    parameter.grad = grads
    optimizer = torch.optim.Adam([parameter], lr=1e-3, fused=True)
    optimizer.step()
    state = optimizer.state[parameter]
    state["exp_avg"].copy_(exp_avg)
    state["exp_avg_sq"].copy_(exp_avg_sq)
    if not amp:
        def step() -> None:
            torch.nn.utils.clip_grad_norm_([parameter], MAX_NORM, foreach=True)
            optimizer.step()
        return step
    # torch writes the gradients (unscale_, then the clip's scale): with a scale of 1 they stay the same
    # size from round to round instead of shrinking 1024x a round to denormals; its passes run all the same
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**9)
    scaler.scale(torch.ones(()))  # sets up the scale, as scaling the loss does

    def amp_step() -> None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([parameter], MAX_NORM, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        scaler.scale(torch.ones(()))
    return amp_step


def measure(n: int, rounds: int) -> None:
    buffers = _buffers(n)
    for case, amp in (("clip", False), ("amp", True)):
        ours_buffers = [b.copy() for b in buffers]
        if amp:
            ours_buffers[1] *= LOSS_SCALE
        traffic = [b.copy() for b in buffers]
        steps = {"fastradam": _ours(ours_buffers, LOSS_SCALE if amp else 1.0),
                 "same_traffic": lambda: (same_traffic_read(traffic[1]), same_traffic_step(*traffic)),
                 "torch": _torch(buffers, amp)}
        for step in steps.values():
            step()
        times = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                times[name].append(_time(step))
        t = {name: np.array(v) for name, v in times.items()}
        ours = np.median(t["fastradam"])
        torch_bytes = BYTES["torch_amp" if amp else "torch_clip"]
        print(f"{case:4s} N={n:,}: fastradam {ours * 1e3:.2f} ms ({BYTES['fastradam'] * n / ours / 1e9:.1f} GB/s), "
              f"share of same-traffic {np.median(t['same_traffic'] / t['fastradam']):.2f}; torch "
              f"{np.median(t['torch']) * 1e3:.2f} ms ({torch_bytes} B/element): fastradam "
              f"{np.median(t['torch'] / t['fastradam']):.2f}x faster (paired median; bytes {torch_bytes / 32:.2f}x)",
              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16 * 2**20, 64 * 2**20])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    for n in args.n:
        measure(n, args.rounds)
