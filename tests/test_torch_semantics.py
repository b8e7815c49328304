"""fastradam.torch.RAdam against torch.optim.RAdam where users change an optimizer by hand.

Each test does the same thing to both optimizers (clear or replace the state, assign state
tensors, append parameters to a group, copy or pickle the optimizer, change the default dtype)
and checks that the drop-in follows torch: the same trajectory (float64, a few steps: the two
implementations differ by rounding only, ~1e-16 per step) and a consistent ``state_dict``. Where
fastradam refuses instead (a parameter listed twice, parameters sharing memory), the error is
checked.
"""

from __future__ import annotations

import collections
import copy
import gc
import io
import pickle
import warnings
import weakref

import pytest
import torch

import fastradam.torch as ft
from test_torch_optimizer import assert_close, assert_identical

TOLERANCE = 1e-12  #: relative, float64, ~10 steps (the rounding differences are ~1e-16 per step)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def groups(model):
    return [{"params": [model[0].weight, model[0].bias], "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"params": [model[2].weight, model[2].bias], "lr": 3e-3}]


def build(cls, model, params=None):
    kwargs = {"foreach": False} if cls is torch.optim.RAdam else {}
    return cls(groups(model) if params is None else params, lr=1e-2, **kwargs)


def pair():
    """The same model under torch.optim.RAdam(foreach=False) and fastradam.torch.RAdam."""
    reference, fused = make_model(), make_model()
    return reference, build(torch.optim.RAdam, reference), fused, build(ft.RAdam, fused)


DATA = (torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64),)
DATA = DATA + (torch.sin(DATA[0].sum(1, keepdim=True)),)


def train(model, optimizer, steps, skip=()):
    """``steps`` steps; the parameters in ``skip`` get no gradient."""
    x, y = DATA
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        for p in skip:
            p.grad = None
        optimizer.step()


def both(reference, torch_opt, fused, fused_opt, steps, skip=lambda model: ()):
    train(reference, torch_opt, steps, skip(reference))
    train(fused, fused_opt, steps, skip(fused))


def assert_same_state(torch_opt, fused_opt, tolerance=TOLERANCE):
    """Both state dicts hold the same parameters, step counts (and dtypes) and moments."""
    theirs, ours = torch_opt.state_dict()["state"], fused_opt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for key, entry in theirs.items():
        assert type(ours[key]) is dict and list(ours[key]) == list(entry)
        if not entry:
            continue  # an empty entry (state[p] = {}): fresh state at the next gradient
        assert ours[key]["step"].item() == entry["step"].item() and ours[key]["step"].dtype == entry["step"].dtype
        for name in ("exp_avg", "exp_avg_sq"):
            scale = max(entry[name].abs().max().item(), 1e-30)
            assert (ours[key][name] - entry[name]).abs().max().item() <= tolerance * scale, (key, name)


# -- the state cleared, replaced or deleted ------------------------------------------------------


def clear(model, optimizer):
    optimizer.state.clear()


def reassign(model, optimizer):
    optimizer.state = collections.defaultdict(dict)


def delete(model, optimizer):
    del optimizer.state[model[0].weight]


def reset_entry(model, optimizer):
    optimizer.state[model[2].weight] = {}


@pytest.mark.parametrize("change", [clear, reassign, delete, reset_entry])
def test_state_changed_by_hand_restarts_from_fresh_state_as_torch(change, tmp_path):
    reference, torch_opt, fused, fused_opt = pair()
    both(reference, torch_opt, fused, fused_opt, 6)
    change(reference, torch_opt)
    change(fused, fused_opt)
    assert_same_state(torch_opt, fused_opt)  # what a checkpoint taken now holds
    # the next step: one cleared parameter has no gradient, so it stays without state (as torch)
    both(reference, torch_opt, fused, fused_opt, 1, skip=lambda model: [model[2].bias])
    assert_same_state(torch_opt, fused_opt)
    both(reference, torch_opt, fused, fused_opt, 4)
    assert_close(reference, fused, TOLERANCE)
    assert_same_state(torch_opt, fused_opt)
    # every later checkpoint holds the state the step uses, and loads with weights_only
    torch.save(fused_opt.state_dict(), tmp_path / "opt.pt")
    resumed_model = make_model(seed=3)
    resumed_model.load_state_dict(fused.state_dict())
    resumed = build(torch.optim.RAdam, resumed_model)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train(resumed_model, resumed, 3)
    train(reference, torch_opt, 3)
    assert_close(reference, resumed_model, TOLERANCE)


def test_unchanged_steps_do_not_resync(monkeypatch):
    """The per-step check is identities only: an unchanged step follows nothing."""
    model = make_model()
    optimizer = build(ft.RAdam, model)
    train(model, optimizer, 2)
    calls = []
    follow = optimizer._follow
    monkeypatch.setattr(optimizer, "_follow", lambda *args, **kwargs: (calls.append(args), follow(*args, **kwargs)))
    train(model, optimizer, 3)
    optimizer.param_groups[0]["lr"] = 5e-3  # what a scheduler does: no resync either
    optimizer.step()
    assert calls == []
    optimizer.state[model[0].bias]["exp_avg"] = torch.zeros(8, dtype=torch.float64)
    optimizer.step()
    assert len(calls) == 1


# -- state tensors replaced ------------------------------------------------------------------


def test_assigned_state_tensors_are_used_by_the_step_as_torch():
    reference, torch_opt, fused, fused_opt = pair()
    both(reference, torch_opt, fused, fused_opt, 4)
    for model, optimizer in ((reference, torch_opt), (fused, fused_opt)):
        optimizer.state[model[0].weight]["exp_avg"] = torch.full((8, 4), 0.5, dtype=torch.float64)
        optimizer.state[model[0].bias]["step"] = torch.tensor(40.0)
        entry = optimizer.state[model[2].weight]
        optimizer.state[model[2].weight] = {"step": entry["step"].clone(), "exp_avg": -entry["exp_avg"],
                                            "exp_avg_sq": entry["exp_avg_sq"].clone()}
    assert_same_state(torch_opt, fused_opt)
    both(reference, torch_opt, fused, fused_opt, 3)
    assert_close(reference, fused, TOLERANCE)
    assert_same_state(torch_opt, fused_opt)  # not the stale assigned tensors: the live state
    assert fused_opt.state[fused[0].bias]["step"].item() == 43
    (bucket,) = fused_opt._buckets  # the entries view the flat buffers again
    storage = bucket.exp_avg_flat.untyped_storage().data_ptr()
    assert all(entry["exp_avg"].untyped_storage().data_ptr() == storage for entry in fused_opt.state.values())


def test_swapped_state_tensors_of_two_parameters_are_read_before_written():
    def run(cls):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, dtype=torch.float64)) for _ in range(2)]
        optimizer = build(cls, None, params)
        for step in range(4):
            for k, p in enumerate(params):
                p.grad = torch.full_like(p, float(k + 1 + step))
            optimizer.step()
            if step == 1:
                a, b = (optimizer.state[p] for p in params)
                a["exp_avg"], b["exp_avg"] = b["exp_avg"], a["exp_avg"]
        return params, optimizer

    (theirs, torch_opt), (ours, fused_opt) = run(torch.optim.RAdam), run(ft.RAdam)
    assert all(torch.allclose(a, b, rtol=TOLERANCE, atol=0) for a, b in zip(theirs, ours))
    assert_same_state(torch_opt, fused_opt)


def test_state_tensors_swapped_between_two_buffers_are_read_before_written():
    """float32 and float64 parameters live in two buckets: the swap is read from both before either writes."""
    a, b = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    optimizer = ft.RAdam([a, b])
    for _ in range(2):
        a.grad, b.grad = torch.ones_like(a), torch.full_like(b, -2.0)
        optimizer.step()
    assert len(optimizer._buckets) == 2
    first, second = (optimizer.state[p] for p in (a, b))
    before = first["exp_avg"].clone(), second["exp_avg"].clone()
    first["exp_avg"], second["exp_avg"] = second["exp_avg"], first["exp_avg"]
    a.grad = b.grad = None
    optimizer.step()  # follows the swap (no gradient: nothing stepped)
    assert torch.equal(optimizer.state[a]["exp_avg"], before[1].float())
    assert torch.equal(optimizer.state[b]["exp_avg"], before[0].double())


def test_an_assigned_state_tensor_of_the_wrong_shape_is_refused_before_any_write():
    model = make_model()
    optimizer = build(ft.RAdam, model)
    train(model, optimizer, 2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.state[model[0].weight]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"optimizer state of param_groups\[0\]\['params'\]\[0\]: exp_avg must be "
                                         r"a tensor of shape \(8, 4\)"):
        train(model, optimizer, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def snapshot(optimizer):
    return [t.clone() for b in optimizer._buckets for t in (b.param_flat, b.exp_avg_flat, b.exp_avg_sq_flat, b.steps)]


def test_a_refused_option_or_gradient_leaves_a_change_made_by_hand_unfollowed():
    model = make_model()
    optimizer = build(ft.RAdam, model)
    train(model, optimizer, 2)
    buckets, before = optimizer._buckets, snapshot(optimizer)
    assigned = torch.full((8, 4), 0.5, dtype=torch.float64)
    optimizer.state[model[0].weight]["exp_avg"] = assigned
    optimizer.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"groups\[1\]\.lr must be finite and >= 0"):
        optimizer.step()
    optimizer.param_groups[1]["lr"] = 3e-3
    model[2].bias.grad = torch.ones(1, dtype=torch.float64).to_sparse()
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[1\] has a sparse gradient"):
        optimizer.step()
    assert optimizer.state[model[0].weight]["exp_avg"] is assigned  # not copied in yet
    extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer.param_groups[0]["params"].append(extra)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[1\] has a sparse gradient"):
        optimizer.step()
    assert optimizer._buckets is buckets and extra not in optimizer.state  # not repacked
    assert all(map(torch.equal, before, snapshot(optimizer)))
    optimizer.zero_grad()
    optimizer.step()  # fixed: the changes are followed (no gradient: nothing stepped)
    assert torch.equal(optimizer.state[model[0].weight]["exp_avg"], assigned) and optimizer._buckets is not buckets


def test_a_change_by_hand_to_one_optimizer_leaves_another_alone(monkeypatch):
    """Each optimizer counts its own changes; an entry of one assigned into another is copied, not re-pointed."""
    models = make_model(), make_model(seed=1)
    first, second = (build(ft.RAdam, model) for model in models)
    for model, optimizer in zip(models, (first, second)):
        train(model, optimizer, 1)
    calls = []
    follow = second._follow
    monkeypatch.setattr(second, "_follow", lambda *args, **kwargs: (calls.append(args), follow(*args, **kwargs)))
    first.state[models[0][0].bias]["exp_avg"] = torch.zeros(8, dtype=torch.float64)
    first.param_groups[0]["params"].append(models[0][2].weight)
    train(models[1], second, 1)
    assert calls == []
    entry = first.state[models[0][0].weight]
    second.state[models[1][0].weight] = entry
    train(models[1], second, 1)
    assert len(calls) == 1 and second.state[models[1][0].weight] is not entry
    storage = first._buckets[0].exp_avg_flat.untyped_storage().data_ptr()
    assert entry["exp_avg"].untyped_storage().data_ptr() == storage  # still the first optimizer's


# -- copies ------------------------------------------------------------------------------------


def test_deepcopy_of_model_and_optimizer_trains_the_copy():
    model = make_model()
    optimizer = build(ft.RAdam, model)
    train(model, optimizer, 3)
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    assert optimizer_copy.param_groups[0]["params"][0] is model_copy[0].weight
    assert_identical(model, model_copy)
    train(model_copy, optimizer_copy, 4)  # the original is untouched by the copy's steps
    assert not torch.equal(model[0].weight, model_copy[0].weight)
    train(model, optimizer, 4)
    assert_identical(model, model_copy)
    assert all(torch.equal(a, b) for a, b in zip(optimizer.state_dict()["state"][0].values(),
                                                 optimizer_copy.state_dict()["state"][0].values()))
    # the reported failure: load_state_dict on the copy
    optimizer_copy.load_state_dict(optimizer.state_dict())
    train(model, optimizer, 2)
    train(model_copy, optimizer_copy, 2)
    assert_identical(model, model_copy)


def test_deepcopy_of_the_optimizer_alone_holds_copies_of_the_parameters_as_torch():
    reference, torch_opt, fused, fused_opt = pair()
    both(reference, torch_opt, fused, fused_opt, 3)
    torch_copy, fused_copy = copy.deepcopy(torch_opt), copy.deepcopy(fused_opt)
    for model, optimizer in ((reference, torch_copy), (fused, fused_copy)):
        copied = optimizer.param_groups[0]["params"][0]
        assert copied is not model[0].weight and torch.equal(copied, model[0].weight)
    # each copy steps its own parameters (given gradients), the same way
    for optimizer in (torch_copy, fused_copy):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        optimizer.step()
    for a, b in zip(torch_copy.param_groups, fused_copy.param_groups):
        for pa, pb in zip(a["params"], b["params"]):
            assert torch.allclose(pa, pb, rtol=TOLERANCE, atol=0)
    assert_same_state(torch_copy, fused_copy)
    both(reference, torch_opt, fused, fused_opt, 2)  # the originals carry on untouched
    assert_close(reference, fused, TOLERANCE)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_saved_or_pickled_optimizer_resumes_identically(how):
    model = make_model()
    optimizer = build(ft.RAdam, model)
    train(model, optimizer, 3)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save((model, optimizer), buffer)
        buffer.seek(0)
        loaded_model, loaded = torch.load(buffer, weights_only=False)
    else:
        loaded_model, loaded = pickle.loads(pickle.dumps((model, optimizer)))
    loaded.zero_grad()  # the reported failure: AttributeError on the first call
    train(loaded_model, loaded, 4)
    train(model, optimizer, 4)
    assert_identical(model, loaded_model)
    assert loaded.state_dict()["state"][0]["step"].item() == 7


def test_a_pickled_optimizer_writes_its_state_tensors_once():
    """pickle writes a view's whole storage for each view: the state goes as compact copies."""
    params = [torch.nn.Parameter(torch.randn(1024, dtype=torch.float64)) for _ in range(8)]
    optimizer = ft.RAdam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    moments = 2 * sum(p.numel() * p.element_size() for p in params)
    # (the parameters are pickled as they are: each one's .data views the whole flat parameter buffer)
    state = len(pickle.dumps(optimizer)) - len(pickle.dumps(params))
    assert state < 1.5 * moments
    loaded = pickle.loads(pickle.dumps(optimizer))
    assert all(torch.equal(a, b) for entries in zip(optimizer.state_dict()["state"].values(),
                                                    loaded.state_dict()["state"].values())
               for a, b in zip(*(entry.values() for entry in entries)))


def test_shallow_copy_shares_groups_state_and_buffers_as_torch():
    model = make_model()
    optimizer = build(ft.RAdam, model)
    train(model, optimizer, 2)
    shallow = copy.copy(optimizer)
    assert shallow.state is optimizer.state and shallow.param_groups is optimizer.param_groups
    train(model, shallow, 2)
    train(model, optimizer, 2)  # the original still steps the same parameters
    assert optimizer.state[model[0].weight]["step"].item() == 6


def test_a_shallow_copy_and_its_original_follow_a_repack_made_through_either():
    reference, fused = make_model(), make_model()
    torch_opt = build(torch.optim.RAdam, reference, [reference[0].weight, reference[0].bias])
    fused_opt = build(ft.RAdam, fused, [fused[0].weight, fused[0].bias])
    torch_copy, fused_copy = copy.copy(torch_opt), copy.copy(fused_opt)
    for model, optimizer in ((reference, torch_opt), (fused, fused_opt)):
        optimizer.param_groups[0]["params"].append(model[2].weight)
    for model, optimizers in ((reference, (torch_opt, torch_copy)), (fused, (fused_opt, fused_copy))):
        for optimizer in optimizers + optimizers[:1]:  # the original repacks, then both step
            train(model, optimizer, 1)
    assert_close(reference, fused, TOLERANCE)
    assert_same_state(torch_opt, fused_opt)


# -- parameters added by hand, listed twice, sharing memory ---------------------------------------


def test_a_parameter_appended_to_a_group_by_hand_is_trained_as_torch():
    reference, fused = make_model(), make_model()
    torch_opt = build(torch.optim.RAdam, reference, [reference[0].weight, reference[0].bias])
    fused_opt = build(ft.RAdam, fused, [fused[0].weight, fused[0].bias])
    both(reference, torch_opt, fused, fused_opt, 3)
    for model, optimizer in ((reference, torch_opt), (fused, fused_opt)):
        optimizer.param_groups[0]["params"].append(model[2].weight)
        optimizer.param_groups[0]["params"] += [model[2].bias]
    fused[2].bias.grad = torch.ones(1, dtype=torch.float64)
    fused_opt.zero_grad()  # zeroes the appended ones too, as torch's
    assert fused[2].bias.grad is None
    both(reference, torch_opt, fused, fused_opt, 4)
    assert_close(reference, fused, TOLERANCE)
    assert_same_state(torch_opt, fused_opt)
    # and one removed by hand is no longer stepped
    for optimizer in (torch_opt, fused_opt):
        del optimizer.param_groups[0]["params"][1]
    frozen = fused[0].bias.detach().clone()
    both(reference, torch_opt, fused, fused_opt, 2)
    assert torch.equal(fused[0].bias, frozen) and torch.equal(reference[0].bias, frozen)
    assert_close(reference, fused, TOLERANCE)


def test_a_parameter_removed_by_hand_keeps_no_buffer_alive():
    """Its values, gradient (a view of the flat gradient buffer) and state (torch keeps it) become its own."""
    model = make_model()
    optimizer = build(ft.RAdam, model)
    x, y = DATA
    for _ in range(2):
        optimizer.zero_grad(set_to_none=False)  # the gradients become views of the flat gradient buffer
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
    removed = model[0].bias
    values = [t.clone() for t in (removed.detach(), removed.grad, *optimizer.state[removed].values())]
    (bucket,) = optimizer._buckets
    storages = [weakref.ref(t.untyped_storage()) for t in (bucket.param_flat, bucket.grad_flat, bucket.exp_avg_flat,
                                                            bucket.exp_avg_sq_flat, bucket.steps)]
    del bucket
    optimizer.param_groups[0]["params"].pop(1)
    optimizer.step()  # repacks the others
    gc.collect()
    assert all(storage() is None for storage in storages)
    kept = [removed.detach(), removed.grad, *optimizer.state[removed].values()]
    assert all(map(torch.equal, kept, values))


def test_a_group_appended_by_hand_is_trained():
    model = make_model()
    optimizer = build(ft.RAdam, model, [model[0].weight, model[0].bias])
    optimizer.param_groups.append({**optimizer.param_groups[0], "params": [model[2].weight, model[2].bias]})
    before = model[2].weight.detach().clone()
    train(model, optimizer, 2)
    assert not torch.equal(model[2].weight, before)
    assert optimizer.state[model[2].weight]["step"].item() == 2


def test_a_parameter_listed_twice_gets_torchs_error():
    model = make_model()
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):  # torch's own warning
        with pytest.raises(ValueError, match="optimizer contains a parameter group with duplicate parameters"):
            ft.RAdam([model[0].weight, model[0].weight])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        ft.RAdam([{"params": [model[0].weight]}, {"params": [model[0].weight]}])
    optimizer = build(ft.RAdam, model)
    train(model, optimizer, 1)
    optimizer.param_groups[1]["params"].append(model[0].bias)  # already in group 0
    with pytest.raises(ValueError, match=r"some parameters appear in more than one parameter group: "
                                         r"param_groups\[1\]\['params'\]\[2\] is param_groups\[0\]\['params'\]\[1\]"):
        optimizer.step()
    optimizer.param_groups[1]["params"][-1] = model[2].weight  # now twice in group 1
    with pytest.raises(ValueError, match="duplicate parameters"):
        optimizer.zero_grad()
    optimizer.param_groups[1]["params"].pop()
    train(model, optimizer, 1)  # fixed by hand: carries on
    assert optimizer.state[model[0].bias]["step"].item() == 2


def test_parameters_sharing_memory_are_refused_at_construction():
    base = torch.zeros(6, dtype=torch.float64)
    tied = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    cases = [[tied, torch.nn.Parameter(tied.data)],  # two Parameter objects over one storage
             [torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[2:])],  # overlapping views
             [torch.nn.Parameter(base.view(2, 3)), torch.nn.Parameter(base[::2])]]  # strided view into it
    for params in cases:
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] and param_groups\[0\]\['params'\]"
                                             r"\[1\] share memory"):
            ft.RAdam(params)
    optimizer = ft.RAdam([tied])
    with pytest.raises(ValueError, match="share memory"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(tied.data[1:])]})
    assert len(optimizer.param_groups) == 1


def test_disjoint_views_and_a_second_optimizer_over_the_same_parameters_are_allowed():
    base = torch.zeros(6, dtype=torch.float64)
    ft.RAdam([torch.nn.Parameter(base[:3]), torch.nn.Parameter(base[3:])])  # disjoint: no memory shared
    model = make_model()
    first = build(ft.RAdam, model)
    train(model, first, 1)
    second = build(ft.RAdam, model)  # the parameters now view first's flat buffer, disjointly
    train(model, second, 1)
    assert second.state[model[0].weight]["step"].item() == 1


# -- step dtype, messages ------------------------------------------------------------------------


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_step_dtype_follows_the_default_dtype_as_torch(default):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        reference, torch_opt, fused, fused_opt = pair()
        both(reference, torch_opt, fused, fused_opt, 2)
    finally:
        torch.set_default_dtype(previous)
    assert fused_opt.state[fused[0].weight]["step"].dtype == default
    assert_same_state(torch_opt, fused_opt)


def test_tensor_lr_messages_say_what_is_wrong_as_torch():
    p = torch.nn.Parameter(torch.zeros(3))
    for cls in (torch.optim.RAdam, ft.RAdam):
        with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
            cls([p], lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match=r"Tensor lr must be 1-element, got shape \(0,\)"):
        ft.RAdam([p], lr=torch.tensor([]))
    with pytest.raises(TypeError, match="lr must be a real number, got a torch.complex64 tensor"):
        ft.RAdam([p], lr=torch.tensor(1e-3 + 0j))
    optimizer = ft.RAdam([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(2))]}])
    optimizer.param_groups[1]["lr"] = torch.tensor([1e-3, 1e-3])
    with pytest.raises(ValueError, match=r"Tensor groups\[1\]\.lr must be 1-element, got shape \(2,\)"):
        optimizer.step()
    optimizer.param_groups[1]["lr"] = torch.tensor(1e-3 + 0j)
    with pytest.raises(TypeError, match=r"groups\[1\]\.lr must be a real number"):
        optimizer.step()
    optimizer.param_groups[1]["lr"] = torch.tensor([1e-3])  # one element, as torch takes it
    p.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert optimizer.state[p]["step"].item() == 1
