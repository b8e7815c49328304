"""Per-rank step time of fastradam.torch.RAdam under ZeroRedundancyOptimizer (with DDP) or FSDP2, CPU/gloo.

Run with 1 and 2 ranks and compare (one thread per rank)::

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 1 bench/distributed_step.py --engine zero
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/distributed_step.py --engine zero
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/distributed_step.py --engine fsdp

Each rank prints medians (ms) over ``--steps`` iterations of its global batch slice:

- ``iteration``: forward + backward + optimizer step, everything included;
- ``backward``: under DDP it includes the gradient all-reduce; under FSDP2 the reduce-scatter
  (forward includes the all-gathers);
- ``step``: the optimizer step; ``local``: fastradam's fused step on this rank's shard alone;
  ``step - local`` is communication (ZeRO: broadcasting each rank's updated shard; FSDP2: none,
  its step is local);
- ``comm share``: (step - local) / iteration, plus, for DDP, backward minus the same backward
  under ``no_sync`` (the all-reduce), over the iteration.

Without torchrun it runs as a single rank (world size 1, gloo).

Recorded on the 2-core dev machine (shared, load ~2; defaults: 8 x Linear(1024, 1024) float32,
8.4M parameters, batch 64; medians of 15 iterations, two runs each, ms):

=========  =====  =================  ===============  ===============================
engine     ranks  iteration          fastradam step   communication in the step
=========  =====  =================  ===============  ===============================
ZeRO+DDP   1      49-56              4.7-4.8          0.7-0.8 (ZeRO bookkeeping)
ZeRO+DDP   2      160-208            3.2-6.7          23-26 (77-89 % of the step)
FSDP2      1      60-65              4.8-5.1          0
FSDP2      2      328-342            3.1-3.6          0 (all-gathers in forward/backward)
=========  =====  =================  ===============  ===============================

With two ranks on two shared cores nothing scales: forward/backward and gloo's TCP collectives
compete for the same cores (DDP's all-reduce ~14-60 ms of the backward; FSDP2's
all-gather/reduce-scatter turn a 60 ms iteration into ~330 ms). What does halve is each rank's
optimizer state (64 -> 32 MiB of moments) and, CPU noise aside, fastradam's step on it
(~4.8 -> ~3.2 ms); ZeRO's step is dominated by broadcasting the updated shards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import fastradam.torch as ft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("zero", "fsdp"), default="zero")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8, help="Linear layers (width x width each)")
    parser.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    layers = []
    for _ in range(args.depth):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    n = args.batch // world
    x = torch.randn(args.batch, args.width)[rank * n:(rank + 1) * n]

    if args.engine == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ft.RAdam, lr=1e-3)
        net = DDP(model, gradient_as_bucket_view=True)
        local_optimizer = optimizer.optim
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        net = fully_shard(model)
        optimizer = local_optimizer = ft.RAdam(model.parameters(), lr=1e-3)

    local_times: list[float] = []
    inner_step = local_optimizer.step

    def timed_local_step(*a, **k):
        start = time.perf_counter()
        result = inner_step(*a, **k)
        local_times.append(time.perf_counter() - start)
        return result

    if args.engine == "zero":
        local_optimizer.step = timed_local_step

    times = {"iteration": [], "forward": [], "backward": [], "step": [], "backward_no_sync": []}
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        loss = net(x).square().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        (optimizer.step() if args.engine == "zero" else timed_local_step())
        t3 = time.perf_counter()
        if i >= args.warmup:
            for key, value in (("iteration", t3 - t0), ("forward", t1 - t0), ("backward", t2 - t1), ("step", t3 - t2)):
                times[key].append(value)
        if args.engine == "zero" and world > 1 and i >= args.warmup:
            with net.no_sync():   # the same backward without DDP's all-reduce (gradients discarded)
                loss = net(x).square().mean()
                t4 = time.perf_counter()
                loss.backward()
                times["backward_no_sync"].append(time.perf_counter() - t4)
    local_times = local_times[-args.steps:]

    ms = {key: 1e3 * statistics.median(value) for key, value in times.items() if value}
    local = 1e3 * statistics.median(local_times)
    step_comm = ms["step"] - local
    allreduce = ms["backward"] - ms["backward_no_sync"] if "backward_no_sync" in ms else 0.0
    state = sum(t.nbytes for b in local_optimizer._buckets for t in (b.exp_avg_flat, b.exp_avg_sq_flat))
    line = (f"rank {rank}/{world} {args.engine}: iteration {ms['iteration']:.2f} ms (forward {ms['forward']:.2f}, "
            f"backward {ms['backward']:.2f}, step {ms['step']:.2f} = fastradam {local:.2f} + communication "
            f"{step_comm:.2f})")
    if args.engine == "zero" and world > 1:
        line += f"; all-reduce in backward ~{allreduce:.2f} ms"
    line += (f"; communication share of the step {step_comm / ms['step']:.0%}, of the iteration "
             f"{(step_comm + allreduce) / ms['iteration']:.0%}"
             f"{' (+ FSDP all-gather/reduce-scatter inside forward/backward)' if args.engine == 'fsdp' else ''}"
             f"; moment buffers {state / 2**20:.1f} MiB")
    for r in range(world):
        if r == rank:
            print(line, flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
