"""fastradam.torch.RAdam inside torch's distributed engines, on the CPU with gloo (2, 3 and 1 processes).

- ZeroRedundancyOptimizer(optimizer_class=fastradam.torch.RAdam) under DDP, and FSDP2
  (``fully_shard``, DTensor parameters): the trajectory equals single-process fastradam and
  torch.optim.RAdam on the full batch (each rank takes an equal slice, the engines average).
- Per-rank optimizer memory: the bytes of the flat buffers are ~1/world of the single-process ones.
- ``consolidate_state_dict`` loads into torch.optim.RAdam and fastradam; a DCP checkpoint of 2
  ranks resumes on 3 and on 1 with the same continuation.
- Under FSDP2 the DCP optimizer state has torch.optim.RAdam's layout (DTensor moments, the same
  placements) and a DCP checkpoint of torch.optim.RAdam loads into fastradam.
- DDP(gradient_as_bucket_view=True): the gradients stay DDP's bucket views (no flat gradient
  buffer of ours, no copy).
- A rank with a bad hyperparameter raises a clear error and writes nothing on that rank.
- ``optimizer.clip_grad_norm_`` under FSDP2 (the norm reduced over the DTensors' mesh) and under
  ZeRO (``process_group=``; ranks hold different numbers of tensors on 3 ranks) equals
  ``torch.nn.utils.clip_grad_norm_`` + ``torch.optim.RAdam`` on the full batch, norms included
  (2-norm and inf, the SUM and MAX reductions).

What the engines guarantee when one rank raises in the step (fastradam checks everything before
its first write, so the failing rank's shard and state are untouched): FSDP2's optimizer step has
no collective, so the other ranks step their shards and the model is then half updated (the next
forward's all-gather waits for the failed rank until the process group's timeout, or fails at
once when its process exits). ZeroRedundancyOptimizer steps the local shard, then broadcasts
every shard: the other ranks have updated their own shard and block in that broadcast (timeout,
or "Connection closed by peer" when the failed process exits; measured with gloo). Neither engine
rolls back; restart from the last checkpoint.

Tolerance: float64 throughout; the runs differ from the single-process ones only in the order of
the gradient reductions (a few ulps per step), so ``1e-10`` relative to a tensor's largest entry,
five orders of magnitude below any real bug (one step moves parameters by ~lr = 1e-2), as in
tests/test_torch_optimizer.py. One spawn per world size keeps the whole file to a few seconds of
spawn/import time per world (each process runs with one thread).
"""

from __future__ import annotations

import datetime
import math
import os
import traceback
import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TOLERANCE = 1e-10
WIDTH, DEPTH, BATCH = 64, 6, 48   # BATCH divisible by 1, 2 and 3: equal slices, so the mean of means is the mean
STEPS, SAVE_AT = 6, 3
LR = 1e-2   # DEPTH 6: ZeRO gives each of 2 or 3 ranks the same number of equal layers
TIMEOUT = 30   # seconds a collective waits for a failed peer before raising (no hangs in CI)


def make_model(seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers).double()


def batch(step):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, WIDTH, generator=generator, dtype=torch.float64)
    return x, torch.sin(x.sum(1))


def loss_of(model, x, y):
    return ((model(x).sum(1) - y) ** 2).mean()


def rank_slice(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def train(model, optimizer, steps, start=0, rank=0, world=1, set_to_none=True):
    for s in range(start, start + steps):
        x, y = batch(s)
        optimizer.zero_grad(set_to_none=set_to_none)
        loss_of(model, rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
        optimizer.step()


def reference(steps, optimizer_class):
    model = make_model()
    optimizer = optimizer_class(model.parameters(), lr=LR, weight_decay=0.01, decoupled_weight_decay=True)
    train(model, optimizer, steps)
    return model, optimizer


def full(t):
    """A plain tensor of the whole value (gathers a DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def assert_close(actual, expected, what):
    actual, expected = full(actual), full(expected)
    scale = expected.abs().max().clamp_min(1e-30)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= TOLERANCE, f"{what}: relative error {error:.3g} > {TOLERANCE}"


def buffer_bytes(optimizer):
    """What the optimizer's flat buffers hold: parameters (unless sharded), moments, step counts."""
    return sum(t.nbytes for b in optimizer._buckets
               for t in (b.param_flat, b.exp_avg_flat, b.exp_avg_sq_flat, b.steps))


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def fsdp_optimizer(model):
    import fastradam.torch as ft

    return ft.RAdam(model.parameters(), lr=LR, weight_decay=0.01, decoupled_weight_decay=True)


# -- the scenarios, run on every rank ---------------------------------------------------------

def check_zero(rank, world):
    import fastradam.torch as ft
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ft.RAdam, lr=LR, weight_decay=0.01,
                                        decoupled_weight_decay=True)
    ddp = DDP(model)
    train(ddp, optimizer, STEPS, rank=rank, world=world)
    expected, expected_optimizer = reference(STEPS, ft.RAdam)
    torch_model, _ = reference(STEPS, torch.optim.RAdam)
    for p, q, r in zip(model.parameters(), expected.parameters(), torch_model.parameters()):
        assert_close(p, q, "ZeRO vs fastradam")
        assert_close(p, r, "ZeRO vs torch.optim.RAdam")
    local = optimizer.optim
    assert isinstance(local, ft.RAdam)
    ratio = buffer_bytes(local) / buffer_bytes(expected_optimizer)
    assert ratio <= 1.1 / world, f"ZeRO rank {rank}: {ratio:.3f} of the single-process optimizer memory"
    optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        state = optimizer.state_dict()
        for cls in (torch.optim.RAdam, ft.RAdam):
            fresh = make_model()
            loaded = cls(fresh.parameters(), lr=LR)
            loaded.load_state_dict(state)
            for p, q in zip(fresh.parameters(), expected.parameters()):
                mine, theirs = loaded.state[p], expected_optimizer.state[q]
                assert float(mine["step"]) == STEPS
                assert_close(mine["exp_avg"], theirs["exp_avg"], f"consolidated exp_avg into {cls.__module__}")
                assert_close(mine["exp_avg_sq"], theirs["exp_avg_sq"], "consolidated exp_avg_sq")


CLIP = {2.0: 0.5, float("inf"): 0.05}  # max_norm per norm type: below the norms here, so every step clips


def clip_reference(steps, norm_type, skip=()):
    """torch.optim.RAdam with torch.nn.utils.clip_grad_norm_ on the full batch (the steps in ``skip``
    skipped, as a GradScaler skips them); the norms it returned."""
    model = make_model()
    optimizer = torch.optim.RAdam(model.parameters(), lr=LR, weight_decay=0.01, decoupled_weight_decay=True)
    norms = []
    for s in range(steps):
        optimizer.zero_grad()
        loss_of(model, *batch(s)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP[norm_type], norm_type))
        if s not in skip:
            optimizer.step()
    return model, norms


def train_clipped(model, optimizer, clip, steps, norm_type, rank, world):
    norms = []
    for s in range(steps):
        x, y = batch(s)
        optimizer.zero_grad()
        loss_of(model, rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
        norms.append(clip(CLIP[norm_type], norm_type))
        optimizer.step()
    return norms


def check_clip(model, norms, norm_type, what):
    expected, expected_norms = clip_reference(len(norms), norm_type)
    assert all(float(n) > CLIP[norm_type] for n in expected_norms)  # clipped at every step
    for n, e in zip(norms, expected_norms):
        assert n.dtype == e.dtype and not hasattr(n, "placements")
        assert_close(n, e, f"{what} norm")
    for p, q in zip(model.parameters(), expected.parameters()):
        assert_close(p, q, f"{what} vs torch.optim.RAdam + clip_grad_norm_")


def check_clip_fsdp(rank, world):
    for norm_type in CLIP:
        model = shard(make_model())
        optimizer = fsdp_optimizer(model)
        norms = train_clipped(model, optimizer, optimizer.clip_grad_norm_, 3, norm_type, rank, world)
        check_clip(model, norms, norm_type, f"FSDP2 clip ({norm_type})")


def check_clip_fsdp_amp(rank, world):
    """fastradam.torch.GradScaler under FSDP2: unscale_ + clip + step; an inf in rank 0's shard at step 1
    makes every rank skip it (the pre-pass norm is global) and the scale back off everywhere."""
    import fastradam.torch as ft

    model = shard(make_model())
    optimizer = fsdp_optimizer(model)
    scaler = ft.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=100)
    norms, scales = [], []
    for s in range(3):
        x, y = batch(s)
        optimizer.zero_grad()
        scaler.scale(loss_of(model, rank_slice(x, rank, world), rank_slice(y, rank, world))).backward()
        if s == 1 and rank == 0:
            next(p for p in model.parameters() if p.grad.to_local().numel()).grad.to_local().view(-1)[0] = float("inf")
        scaler.unscale_(optimizer)
        norms.append(optimizer.clip_grad_norm_(CLIP[2.0]))
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales == [2.0 ** 8, 2.0 ** 7, 2.0 ** 7] and math.isinf(norms[1])
    expected, expected_norms = clip_reference(3, 2.0, skip=(1,))
    for n, e in zip(norms[::2], expected_norms[::2]):
        assert_close(n, e, "FSDP2 + GradScaler norm")
    for p, q in zip(model.parameters(), expected.parameters()):
        assert_close(p, q, "FSDP2 + GradScaler vs torch.optim.RAdam + clip_grad_norm_")


def check_clip_zero(rank, world):
    import fastradam.torch as ft
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    for norm_type in CLIP:
        model = make_model()
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ft.RAdam, lr=LR, weight_decay=0.01,
                                            decoupled_weight_decay=True)

        def clip(max_norm, norm_type):
            return optimizer.optim.clip_grad_norm_(max_norm, norm_type, process_group=optimizer.process_group)

        norms = train_clipped(DDP(model), optimizer, clip, 3, norm_type, rank, world)
        check_clip(model, norms, norm_type, f"ZeRO clip ({norm_type})")


def check_zero_bucket_view(rank, world):
    import fastradam.torch as ft
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = make_model()
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ft.RAdam, lr=LR,
                                        parameters_as_bucket_view=True)
    loss_of(model, *batch(0)).backward()
    with pytest.raises(RuntimeError, match="parameters_as_bucket_view=False"):
        optimizer.step()


def check_ddp_bucket_views(rank, world):
    import fastradam.torch as ft
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model, gradient_as_bucket_view=True)
    optimizer = ft.RAdam(model.parameters(), lr=LR, weight_decay=0.01, decoupled_weight_decay=True)
    train(ddp, optimizer, 2, rank=rank, world=world, set_to_none=False)
    pointers = [p.grad.data_ptr() for p in model.parameters()]
    train(ddp, optimizer, STEPS - 2, start=2, rank=rank, world=world, set_to_none=False)
    assert [p.grad.data_ptr() for p in model.parameters()] == pointers, "gradients left DDP's buckets"
    assert all(b.grad_flat is None for b in optimizer._buckets), "an extra flat gradient buffer was allocated"
    expected, _ = reference(STEPS, ft.RAdam)
    for p, q in zip(model.parameters(), expected.parameters()):
        assert_close(p, q, "DDP(gradient_as_bucket_view) vs fastradam")


def check_fsdp(rank, world):
    import fastradam.torch as ft
    from torch.distributed.tensor import DTensor

    model = shard(make_model())
    optimizer = fsdp_optimizer(model)
    train(model, optimizer, STEPS, rank=rank, world=world)
    expected, expected_optimizer = reference(STEPS, ft.RAdam)
    torch_model, _ = reference(STEPS, torch.optim.RAdam)
    for p, q, r in zip(model.parameters(), expected.parameters(), torch_model.parameters()):
        assert isinstance(p, DTensor)
        assert_close(p, q, "FSDP2 vs fastradam")
        assert_close(p, r, "FSDP2 vs torch.optim.RAdam")
        state = optimizer.state[p]
        assert isinstance(state["exp_avg"], DTensor) and state["exp_avg"].placements == p.placements
        assert_close(state["exp_avg"], expected_optimizer.state[q]["exp_avg"], "FSDP2 exp_avg")
    ratio = buffer_bytes(optimizer) / buffer_bytes(expected_optimizer)
    assert ratio <= 1.1 / world, f"FSDP2 rank {rank}: {ratio:.3f} of the single-process optimizer memory"


def state_layout(state_dict):
    """Per parameter and key: type, placements, shape, dtype; the sorted group keys."""
    state = {key: {name: (type(v).__name__, getattr(v, "placements", None), tuple(v.shape), v.dtype)
                   for name, v in entry.items()} for key, entry in state_dict["state"].items()}
    return state, [sorted(group) for group in state_dict["param_groups"]]


def check_fsdp_torch_interchange(rank, world, directory):
    """The DCP optimizer state has torch.optim.RAdam's layout, and a torch DCP checkpoint loads into fastradam."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_state_dict

    layouts = []
    for make in (lambda m: torch.optim.RAdam(m.parameters(), lr=LR, weight_decay=0.01, decoupled_weight_decay=True),
                 fsdp_optimizer):
        model = shard(make_model())
        optimizer = make(model)
        train(model, optimizer, 2, rank=rank, world=world)
        layouts.append(state_layout(get_optimizer_state_dict(model, optimizer)))
        if not layouts[1:]:
            dcp.save(dcp_state(model, optimizer), checkpoint_id=os.path.join(directory, "torch-checkpoint"))
            torch_model, torch_optimizer = model, optimizer
    assert layouts[0] == layouts[1]
    model = shard(make_model(seed=1))
    optimizer = fsdp_optimizer(model)
    state = dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=os.path.join(directory, "torch-checkpoint"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for p, q in zip(model.parameters(), torch_model.parameters()):
        assert torch.equal(p.to_local(), q.to_local())
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][name].to_local(), torch_optimizer.state[q][name].to_local())
        assert float(optimizer.state[p]["step"]) == 2


def check_fsdp_bad_rank(rank, world):
    """A bad lr on the last rank: a clear error there, nothing written there; the step has no collective."""
    model = shard(make_model())
    optimizer = fsdp_optimizer(model)
    train(model, optimizer, 1, rank=rank, world=world)
    x, y = batch(1)
    optimizer.zero_grad()
    loss_of(model, rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
    before = [p.to_local().clone() for p in model.parameters()]
    states = [optimizer.state[p]["exp_avg"].to_local().clone() for p in model.parameters()]
    bad = rank == world - 1
    if bad:
        optimizer.param_groups[0]["lr"] = -1.0
        with pytest.raises(ValueError, match="lr"):
            optimizer.step()
    else:
        optimizer.step()
    for p, b, s in zip(model.parameters(), before, states):
        unchanged = torch.equal(p.to_local(), b) and torch.equal(optimizer.state[p]["exp_avg"].to_local(), s)
        assert unchanged == bad or p.to_local().numel() == 0
        assert float(optimizer.state[p]["step"]) == (1 if bad else 2)


def dcp_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optimizer_state}


def check_dcp_save(rank, world, directory):
    import torch.distributed.checkpoint as dcp

    model = shard(make_model())
    optimizer = fsdp_optimizer(model)
    train(model, optimizer, SAVE_AT, rank=rank, world=world)
    dcp.save(dcp_state(model, optimizer), checkpoint_id=os.path.join(directory, "checkpoint"))
    train(model, optimizer, STEPS - SAVE_AT, start=SAVE_AT, rank=rank, world=world)
    params = [full(p) for p in model.parameters()]
    if rank == 0:
        torch.save(params, os.path.join(directory, "continued.pt"))


def check_dcp_load(rank, world, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model = shard(make_model(seed=1))   # other initial values: everything must come from the checkpoint
    optimizer = fsdp_optimizer(model)
    state = dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=os.path.join(directory, "checkpoint"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for p in model.parameters():
        assert float(optimizer.state[p]["step"]) == SAVE_AT
    train(model, optimizer, STEPS - SAVE_AT, start=SAVE_AT, rank=rank, world=world)
    expected = torch.load(os.path.join(directory, "continued.pt"))
    for p, q in zip(model.parameters(), expected):
        assert_close(p, q, f"DCP resume on {world} rank(s)")


SCENARIOS = {
    2: [check_zero, check_zero_bucket_view, check_ddp_bucket_views, check_fsdp, check_fsdp_bad_rank,
        check_fsdp_torch_interchange, check_dcp_save, check_clip_fsdp, check_clip_fsdp_amp, check_clip_zero],
    3: [check_zero, check_fsdp, check_dcp_load, check_clip_zero],
    1: [check_dcp_load],
}


def worker(rank, world, directory):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")   # gloo's pairs on the loopback interface only
    torch.set_num_threads(1)
    # A FileStore, not a TCPStore: no rendezvous server that exits with rank 0 while others still tear down.
    store = os.path.join(directory, f"store-{world}")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT))
    failures = []
    try:
        for scenario in SCENARIOS[world]:
            args = (directory,) if scenario in (check_dcp_save, check_dcp_load, check_fsdp_torch_interchange) else ()
            try:
                if os.environ.get("FASTRADAM_DIST_TRACE"):
                    print(f"rank {rank}/{world}: {scenario.__name__}", flush=True)
                scenario(rank, world, *args)
            except Exception:
                failures.append(f"rank {rank}, {scenario.__name__}:\n{traceback.format_exc()}")
                print(failures[-1], flush=True)   # now: a peer may then time out in a collective
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    if os.environ.get("FASTRADAM_DIST_TRACE"):
        print(f"rank {rank}/{world}: destroyed", flush=True)
    if failures:
        raise AssertionError("\n".join(failures))
    with open(os.path.join(directory, f"passed-{world}-{rank}"), "w"):
        pass


def spawn(world, directory):
    import torch.multiprocessing as mp

    try:
        mp.spawn(worker, args=(world, str(directory)), nprocs=world, join=True)
    except mp.ProcessExitedException as error:
        # Rarely (~1 run in 10 here) a gloo process aborts at exit ("terminate called without an
        # active exception", SIGABRT) after everything it ran passed. Tolerated only when every
        # rank wrote its marker, i.e. finished all checks and destroyed its process group.
        passed = all(os.path.exists(os.path.join(directory, f"passed-{world}-{r}")) for r in range(world))
        if not passed or error.signal_name is None:
            raise
        warnings.warn(f"world {world}: a rank exited with {error.signal_name} after passing all checks")


def test_distributed_engines(tmp_path):
    """2 ranks (ZeRO, DDP bucket views, FSDP2, bad rank, DCP save), then 3 (and 1) resuming the DCP checkpoint."""
    for world in (2, 3, 1):
        spawn(world, tmp_path)
