"""Mixed precision: 16-bit storage with float32 math, master weights, grad scaling, skipped steps."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fastradam import FlatLayout, fused_step, fused_step_layout, fused_step_multi
from tests.cases import STORAGES, numpy_dtypes, random_buffers
from tests.oracle_check import assert_matches_oracle

BF16, F16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)

#: (params, grads, moments, master) storage combinations: the shared list, float64 aside (tested elsewhere).
COMBINATIONS = [numpy_dtypes(storage) for storage in STORAGES if storage.params != "float64"]
IDS = ["-".join(str(d) for d in combo[:3]) + ("+master" if combo[3] else "") for combo in COMBINATIONS]


def _stored(size, combo, seed):
    """Fresh random buffers in the combination's storage (values exactly as stored)."""
    p, g, m, v = random_buffers(size, np.float64, seed)
    params, grads, moments, master = combo
    stored = [p.astype(params), g.astype(grads), m.astype(moments), v.astype(moments)]
    master_values = None if master is None else p.astype(master)
    return stored, master_values


@pytest.mark.parametrize("combo", COMBINATIONS, ids=IDS)
@pytest.mark.parametrize("size", [0, 1, 3, 17, 1023, 2**16 + 3])
@pytest.mark.parametrize("hyper", [{"step": 3}, {"step": 10, "weight_decay": 0.1},
                                   {"step": 40, "weight_decay": 0.1, "decoupled_weight_decay": True,
                                    "maximize": True, "flavour": "optax", "eps_root": 1e-6}], ids=str)
def test_storage_combinations_match_the_oracle_within_one_storage_ulp(combo, size, hyper):
    stored, master = _stored(size, combo, seed=size)
    hyper = {"lr": 1e-2, **hyper}
    params_before = stored[0].copy() if master is None else master.copy()
    before = (params_before, *(b.copy() for b in stored[1:]))
    fused_step(*stored, master_params=master, **hyper)
    new_params = stored[0] if master is None else master
    assert_matches_oracle(before, (new_params, stored[2], stored[3]), hyper)
    if master is not None:  # the 16-bit copy is the master rounded, bit for bit
        assert stored[0].tobytes() == master.astype(combo[0]).tobytes()


@pytest.mark.parametrize("combo", COMBINATIONS, ids=IDS)
def test_storage_combinations_as_tensor_lists_match_the_oracle(combo):
    """The address-table kernel, every storage, tensors of odd sizes in one call."""
    tensors = [_stored(size, combo, seed=size) for size in (1, 3, 1023, 2**16 + 5)]
    hyper = {"lr": 1e-2, "weight_decay": 0.1}
    masters = None if combo[3] is None else [master for _, master in tensors]
    before = [(stored[0].copy() if master is None else master.copy(), *(b.copy() for b in stored[1:]))
              for stored, master in tensors]
    fused_step_multi(*([stored[k] for stored, _ in tensors] for k in range(4)), steps=[7] * len(tensors),
                     groups=[hyper], master_params=masters)
    for (stored, master), old in zip(tensors, before):
        assert_matches_oracle(old, (stored[0] if master is None else master, stored[2], stored[3]),
                              {"step": 7, **hyper})
        if master is not None:
            assert stored[0].tobytes() == master.astype(combo[0]).tobytes()


@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if c[0].itemsize == 2 or c[2].itemsize == 2],
                         ids=[i for c, i in zip(COMBINATIONS, IDS) if c[0].itemsize == 2 or c[2].itemsize == 2])
@pytest.mark.parametrize("step", [3, 10])
def test_16_bit_results_are_the_float32_results_rounded_bit_for_bit(combo, step):
    """The same step in float32 storage, then rounded (nearest-even, ml_dtypes/NumPy), must equal
    the 16-bit step: one rounding, at the store, of the same float32 arithmetic."""
    stored, master = _stored(4099, combo, seed=step)
    specials = np.array([0.0, -0.0, 1e-30, -1e-30, 3e-5, 65504.0])  # zeros, subnormal-producing, fp16 max
    stored[0][:6] = specials.astype(combo[0])
    wide = [b.astype(F32) for b in stored]
    if master is not None:
        master[:6] = specials.astype(F32)
        wide[0] = master.copy()
    fused_step(*wide, step=step, lr=1e-2, weight_decay=0.1)
    fused_step(*stored, step=step, lr=1e-2, weight_decay=0.1, master_params=master)
    for narrow, full in ((stored[0], wide[0]), (stored[2], wide[2]), (stored[3], wide[3])):
        assert narrow.tobytes() == full.astype(narrow.dtype).tobytes()
    if master is not None:
        assert master.tobytes() == wide[0].tobytes()


def _at_byte_offset(values, offset):
    """``values`` copied into a buffer that starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(values.nbytes + 64 + offset, np.uint8)
    start = -raw.__array_interface__["data"][0] % 64 + offset
    view = raw[start:start + values.nbytes].view(values.dtype)
    view[...] = values
    return view


def _step_bfloat16(entry, buffers, hyper):
    """One step of the buffers through ``entry``: a flat buffer, a one-tensor list, or a layout of
    three segments packed without alignment (so segments start at odd elements)."""
    if entry == "flat":
        fused_step(*buffers, step=10, **hyper)
    elif entry == "tensor_list":
        fused_step_multi(*([b] for b in buffers), steps=[10], groups=[hyper])
    else:
        size = buffers[0].size
        layout = FlatLayout([(size // 3,), (1,), (size - size // 3 - 1,)] if size else [], align=1)
        fused_step_layout(layout, *buffers, steps=np.full(len(layout), 10), groups=[hyper])


@pytest.mark.parametrize("entry", ["flat", "tensor_list", "layout"])
@pytest.mark.parametrize("offsets", [(0, 0, 0, 0), (2, 2, 2, 2), (0, 2, 0, 0), (2, 0, 2, 2), (1, 1, 1, 1),
                                     (0, 0, 0, 1)], ids=str)
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 9, 33, 2**16 + 3])
def test_bfloat16_kernel_pairs_any_alignment_bit_for_bit(entry, offsets, size):
    """All-bfloat16 buffers are stepped two elements a word where their addresses allow (all
    aligned alike, a peeled head when they start at 2 mod 4, an odd tail), one at a time
    otherwise: every case, through every entry point, must equal the float32 step rounded, bit
    for bit."""
    stored, _ = _stored(size, (BF16, BF16, BF16, None), seed=size)
    if size:
        stored[0][0], stored[1][-1] = np.nan, np.inf  # non-finite values in the head and the tail
    hyper = {"lr": 1e-2, "weight_decay": 0.1}
    wide = [b.astype(F32) for b in stored]
    placed = [_at_byte_offset(b, offset) for b, offset in zip(stored, offsets)]
    _step_bfloat16(entry, wide, hyper)
    _step_bfloat16(entry, placed, hyper)
    for narrow, full in ((placed[0], wide[0]), (placed[2], wide[2]), (placed[3], wide[3])):
        assert narrow.tobytes() == full.astype(BF16).tobytes()


def test_non_finite_values_survive_16_bit_storage():
    p, g, m, v = (np.ones(8, dtype=BF16) for _ in range(4))
    g[1], g[2], p[3] = np.inf, np.nan, -np.inf
    fused_step(p, g, m, v, step=10)
    as_float = p.astype(np.float64)
    assert np.isnan(as_float[1]) and np.isnan(as_float[2]) and as_float[3] == -np.inf
    assert np.isfinite(as_float[[0, 4, 5, 6, 7]]).all()


@pytest.mark.parametrize("dtype", [F32, BF16, np.dtype(np.float64)])
def test_power_of_two_grad_scale_is_exact(dtype):
    stored = [b.astype(dtype) for b in random_buffers(1000, np.float64, 1)]
    scaled = [b.copy() for b in stored]
    scaled[1] = (stored[1].astype(np.float64) * 1024).astype(dtype)
    fused_step(*stored, step=9, weight_decay=0.01)
    fused_step(*scaled, step=9, weight_decay=0.01, grad_scale=1024.0)
    for a, b in zip(stored, scaled):
        if a is not stored[1]:
            assert a.tobytes() == b.tobytes()


def test_any_grad_scale_unscales_inside_the_kernel():
    p, g, m, v = random_buffers(1000, np.float32, 2)
    scale = 3000.0
    scaled_grads = (g.astype(np.float64) * scale).astype(np.float32)
    before = (p.copy(), scaled_grads.astype(np.float64) / scale, m.copy(), v.copy())
    fused_step(p, scaled_grads, m, v, step=9, grad_scale=scale)
    assert_matches_oracle(before, (p, m, v), {"step": 9})


@pytest.mark.parametrize("flag", [True, np.bool_(True), np.array(True), np.array(1.0)])
def test_found_inf_skips_the_step_entirely(flag):
    stored = [b.astype(BF16) for b in random_buffers(100, np.float64, 3)]
    master = stored[0].astype(F32)
    snapshot = [b.tobytes() for b in (*stored, master)]
    fused_step(*stored, step=5, master_params=master, found_inf=flag)
    assert [b.tobytes() for b in (*stored, master)] == snapshot


def test_found_inf_false_steps():
    p, g, m, v = random_buffers(10, np.float32, 4)
    before = p.copy()
    fused_step(p, g, m, v, step=5, found_inf=np.array(False))
    assert not np.array_equal(p, before)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, np.dtype(np.float64)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_skips_a_step_with_non_finite_gradients(dtype, bad):
    moments = dtype if dtype in (F32, np.dtype(np.float64)) else BF16
    stored = [b.astype(d) for b, d in zip(random_buffers(70000, np.float64, 5), (dtype, dtype, moments, moments))]
    stored[1][69999] = bad
    snapshot = [b.tobytes() for b in stored]
    fused_step(*stored, step=7, check_finite=True)
    assert [b.tobytes() for b in stored] == snapshot
    stored[1][69999] = 0.5
    expected = [b.copy() for b in stored]
    fused_step(*expected, step=7)
    fused_step(*stored, step=7, check_finite=True)
    assert [b.tobytes() for b in stored] == [b.tobytes() for b in expected]


def test_check_finite_on_a_layout_reads_only_active_segments():
    layout = FlatLayout([(100,), (100,), (100,)])
    flats = [layout.pack([np.full(100, 0.5)] * 3) for _ in range(4)]
    flats[1][100:128] = np.nan  # padding: never read
    flats[1][128 + 5] = np.nan  # segment 1, inactive this step
    before = [f.copy() for f in flats]
    fused_step_layout(layout, *flats, steps=[3, 3, 3], has_grad=[True, False, True], check_finite=True)
    assert not np.array_equal(flats[0][:100], before[0][:100]), "a NaN outside the active segments blocked the step"
    flats = [f.copy() for f in before]
    fused_step_layout(layout, *flats, steps=[3, 3, 3], check_finite=True)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(flats, before)), "a NaN in an active segment"


def test_check_finite_and_master_on_tensor_lists():
    tensors = [[b.astype(BF16) for b in random_buffers(n, np.float64, n)] for n in (5, 300)]
    masters = [t[0].astype(F32) for t in tensors]
    tensors[1][1][7] = np.inf
    lists = [[t[k] for t in tensors] for k in range(4)]
    snapshot = [b.tobytes() for t in tensors for b in t] + [m.tobytes() for m in masters]
    fused_step_multi(*lists, steps=[2, 2], master_params=masters, check_finite=True)
    assert [b.tobytes() for t in tensors for b in t] + [m.tobytes() for m in masters] == snapshot
    fused_step_multi(*lists, steps=[2, 2], master_params=masters, has_grad=[True, False], check_finite=True)
    assert tensors[0][0].tobytes() == masters[0].astype(BF16).tobytes()
    assert tensors[0][0].tobytes() != snapshot[0]


def test_layout_with_bf16_storage_and_master_matches_the_oracle():
    rng = np.random.default_rng(6)
    shapes = [(3,), (70,), (1000,)]
    layout = FlatLayout(shapes, groups=[0, 1, 0])
    groups = [{"lr": 1e-2}, {"lr": 3e-3, "weight_decay": 0.1, "decoupled_weight_decay": True}]
    values = [[rng.standard_normal(s), rng.standard_normal(s), rng.standard_normal(s) * 0.1,
               rng.uniform(0.01, 1, s)] for s in shapes]
    flats = [layout.pack([np.asarray(v[k]).astype(BF16) for v in values]) for k in range(4)]
    master = layout.pack([np.asarray(v[0]).astype(BF16).astype(F32) for v in values])
    before = [f.copy() for f in (master, *flats[1:])]
    fused_step_layout(layout, *flats, steps=[8, 8, 8], groups=groups, master_params=master)
    for i, segment in enumerate(layout.segments):
        part = slice(segment.offset, segment.offset + segment.size)
        assert_matches_oracle(tuple(b[part] for b in before), (master[part], flats[2][part], flats[3][part]),
                              {"step": 8, **groups[segment.group]})
    assert flats[0].tobytes() == master.astype(BF16).tobytes()


#: One hyperparameter set per loop variant of the explicit bfloat16 vector code (fastradam.backends.numba.bf16_lanes):
#: negated gradient (maximize) x coupled weight decay x update mode (rectified, momentum, hold).
VARIANTS = [{"maximize": maximize, "weight_decay": 0.1, "decoupled_weight_decay": not coupled, **mode}
            for maximize in (False, True) for coupled in (False, True)
            for mode in ({"step": 10}, {"step": 2}, {"step": 2, "flavour": "authors"})]


@pytest.mark.parametrize("hyper", VARIANTS, ids=str)
@pytest.mark.parametrize("size", [31, 32, 33, 63, 64, 65, 130, 2**16 + 3])
def test_bfloat16_vector_code_equals_the_float32_step_rounded_in_every_variant(hyper, size):
    """All-bfloat16 buffers, 32 elements per vector: vectors whose results hold a NaN or a
    subnormal must take the exact rounding (the hardware one flushes subnormals and keeps NaN
    payloads, so a payload NaN is planted), the rest the hardware rounding; every result must
    equal the float32 step rounded, bit for bit, in each of the 12 loop variants, with the
    leftover elements in the scalar loop."""
    stored, _ = _stored(size, (BF16, BF16, BF16, None), seed=size)
    if size > 40:
        for buffer, value in zip(stored, (0.0, 0.0, 1e-39, 1e-39)):  # zero p and g: the moments decay to subnormals
            buffer[40] = value
        stored[0].view(np.uint16)[size - 40] = 0xFFA1  # a NaN with a payload: the hardware would keep it
        stored[1][size - 1] = -np.inf  # in the scalar tail
    wide = [b.astype(F32) for b in stored]
    fused_step(*wide, lr=1e-2, **hyper)
    fused_step(*stored, lr=1e-2, **hyper)
    for narrow, full in ((stored[0], wide[0]), (stored[2], wide[2]), (stored[3], wide[3])):
        with np.errstate(invalid="ignore"):  # the NaN's cast
            assert narrow.tobytes() == full.astype(BF16).tobytes()
    if size > 40:  # the special values really were produced, so both roundings ran
        assert 0 < abs(float(stored[2][40])) < ml_dtypes.finfo(BF16).tiny and np.isnan(float(stored[0][size - 40]))
