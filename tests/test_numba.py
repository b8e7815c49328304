"""The Numba CPU backend (through ``fused_step`` on NumPy arrays) against the oracle."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import llvmlite.binding
import ml_dtypes
import numba
import numpy as np
import pytest

from fastradam import fused_step, fused_step_multi
from fastradam.backends import numba as numba_backend
from fastradam.backends.numba import bf16_lanes, kernels as numba_kernels, target as numba_target
from fastradam.flavours import PRESETS
from fastradam.scalars import pack_rows, step_scalars
from tests import cpu_targets, kernel_code
from tests.cases import DTYPES, OPTION_SETS, SIZES, STEPS, random_buffers
from tests.oracle_check import assert_matches_oracle


def _step_and_check(size, dtype, seed, hyper):
    buffers = random_buffers(size, dtype, seed)
    before = tuple(b.copy() for b in buffers)
    fused_step(*buffers, **hyper)
    assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), hyper)
    np.testing.assert_array_equal(buffers[1], before[1])  # grads are read only


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("step", STEPS)
def test_matches_oracle_across_sizes_and_steps(dtype, size, step):
    _step_and_check(size, dtype, seed=size + step, hyper={"step": step, "lr": 1e-2})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
@pytest.mark.parametrize("step", (3, 8))
def test_matches_oracle_for_every_option(dtype, options, step):
    _step_and_check(1023, dtype, seed=step, hyper={"step": step, **options})


@pytest.mark.parametrize("dtype", DTYPES)
def test_trajectory_stays_on_the_oracle(dtype):
    """Twenty steps crossing the threshold, each checked from the backend's own state."""
    buffers = random_buffers(517, dtype, seed=3)
    rng = np.random.default_rng(4)
    for step in range(1, 21):
        buffers[1][:] = rng.standard_normal(517)
        before = tuple(b.copy() for b in buffers)
        hyper = {"step": step, "lr": 0.01, "weight_decay": 0.01}
        fused_step(*buffers, **hyper)
        assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), hyper)


@pytest.mark.parametrize("shape", [(7, 3), (2, 3, 5), (4, 0), ()])
def test_any_shape_is_treated_as_flat(shape):
    size = int(np.prod(shape))
    buffers = tuple(b.reshape(shape) for b in random_buffers(size, np.float64, seed=1))
    before = tuple(b.copy() for b in buffers)
    fused_step(*buffers, step=9)
    assert all(b.shape == shape for b in buffers)
    assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), {"step": 9})


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself
@pytest.mark.parametrize("subclass", ["matrix", "memmap"])
def test_ndarray_subclasses_are_stepped_in_place(subclass, tmp_path):
    """np.matrix (always 2-D, even after reshape(-1)) and np.memmap are stepped as plain arrays."""
    plain = random_buffers(12, np.float32, seed=2)
    if subclass == "matrix":
        buffers = tuple(np.asmatrix(b.reshape(3, 4)) for b in plain)
    else:
        buffers = tuple(np.memmap(tmp_path / f"{i}.bin", np.float32, "w+", shape=(12,)) for i in range(4))
        for target, values in zip(buffers, plain):
            target[:] = values
    before = tuple(np.asarray(b).reshape(-1).copy() for b in buffers)
    fused_step(*buffers, step=9)
    assert all(type(b).__name__ == subclass for b in buffers)
    assert_matches_oracle(before, tuple(np.asarray(b).reshape(-1) for b in (buffers[0], buffers[2], buffers[3])),
                          {"step": 9})


def test_non_finite_gradients_propagate_as_in_torch():
    p, g, m, v = random_buffers(4, np.float32, seed=2)
    g[1], g[2] = np.nan, np.inf
    fused_step(p, g, m, v, step=10)
    assert np.isfinite(p[[0, 3]]).all() and np.isnan(p[1]) and np.isnan(p[2])


def _run(dtype, threads=None):
    buffers = random_buffers(2**16 + 5, dtype, seed=11)
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(threads)
    try:
        for step in range(1, 9):
            fused_step(*buffers, step=step, weight_decay=0.01)
    finally:
        numba.set_num_threads(previous)
    return buffers


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_reruns_and_thread_counts(dtype):
    first, again, one_thread = _run(dtype), _run(dtype), _run(dtype, threads=1)
    for a, b, c in zip(first, again, one_thread):
        assert a.tobytes() == b.tobytes() == c.tobytes()


@pytest.mark.parametrize("size", [numba_kernels.SERIAL_UP_TO, numba_kernels.SERIAL_UP_TO + 1])
@pytest.mark.parametrize("check_finite", [False, True])
def test_small_steps_run_on_one_thread_and_leave_the_thread_count_alone(size, check_finite):
    """A step of at most one block of work runs on the calling thread alone (the kernels set the
    thread count to 1 inside, then restore it): the count the caller set survives every kind of
    launch, and the results are the same bits as with any other count."""
    previous = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            flat = list(random_buffers(size, np.float32, seed=12))
            tensors = [list(random_buffers(n, np.float32, seed=n)) for n in (size // 2, size - size // 2)]
            fused_step(*flat, step=7, check_finite=check_finite)
            assert numba.get_num_threads() == threads
            fused_step_multi(*([t[k] for t in tensors] for k in range(4)), steps=[7, 7], check_finite=check_finite)
            assert numba.get_num_threads() == threads
            results.append([b.tobytes() for b in flat + [b for t in tensors for b in t]])
    finally:
        numba.set_num_threads(previous)
    assert all(r == results[0] for r in results)


def _storage_buffers(storage, size, seed):
    """(params, grads, exp_avg, exp_avg_sq, master) bit views of ``storage`` (numpy dtypes; master
    None or float32), random, with zeros, signed zeros, infinities, NaNs and subnormals planted."""
    buffers = list(random_buffers(size, np.float32, seed))
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-39, 3e38], np.float32)
    for k, buffer in enumerate(buffers):
        buffer[k::37][:specials.size] = np.roll(specials, k)
        buffer[k::41][:3].view(np.uint32)[:] = [0x7FC00001 + k, 0xFFA00000 + k, 0x7F800001 + k]  # own NaN payloads
    buffers[3] = np.abs(buffers[3])
    master = None if storage[3] is None else buffers[0].astype(storage[3])
    with np.errstate(over="ignore", invalid="ignore"):  # 3e38 in float16, NaN payloads
        out = [b.astype(d) for b, d in zip(buffers, storage[:3] + storage[2:3])] + [master]
    return [numba_backend.as_array(b) if b is not None else None for b in out]


@numba.njit
def _takes_the_plain_loop(floats, ints):
    return numba_kernels._is_plain(numba_kernels._row_scalars(floats, ints, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hyper, plain", [
    ({}, True), ({"weight_decay": 0.1, "decoupled_weight_decay": True}, True), ({"weight_decay": 0.1}, False),
    ({"maximize": True}, False), ({"grad_scale": 2.0}, False), ({"grad_scale": 1.0 + 2**-30}, True),  # rounds to 1
    ({"step": 2}, False), ({"step": 2, "flavour": "authors"}, False), ({"weight_decay": -0.0}, True),
    ({"weight_decay": float("nan")}, False)], ids=str)
def test_the_plain_loop_is_taken_exactly_where_its_constants_hold(dtype, hyper, plain):
    """The common-case loop's constants (no L2 decay, ``1 / grad_scale == 1``, not negated,
    rectified) must hold exactly where the kernel takes it, as the table rows say."""
    options = {"step": 9, "grad_scale": 1.0, **hyper}
    grad_scale, step = options.pop("grad_scale"), options.pop("step")
    if "flavour" in options:
        options["flavour"] = PRESETS[options["flavour"]]
    scalars = step_scalars(step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                           weight_decay=options.pop("weight_decay", 0.0),
                           decoupled_weight_decay=options.pop("decoupled_weight_decay", False),
                           maximize=options.pop("maximize", False), **options)
    floats, ints = pack_rows([scalars], np.dtype(dtype), grad_scale=grad_scale)
    expected = plain and not (dtype is np.float64 and grad_scale != 1.0)  # 1 + 2**-30 is not 1 in float64
    assert _takes_the_plain_loop(floats, ints) == expected


@numba.njit
def _element_loops(p, g, m, v, master, floats, ints, plain):
    scalars = numba_kernels._row_scalars(floats, ints, 0)
    if plain:
        numba_kernels._radam_element_loop(p, g, m, v, master, numba_kernels._plain(scalars))
    else:
        numba_kernels._radam_element_loop(p, g, m, v, master, scalars)


@numba.njit
def _word_pair_loops(p, g, m, v, floats, ints, plain):
    scalars = numba_kernels._row_scalars(floats, ints, 0)
    if plain:
        numba_kernels._radam_word_pair_loop(p, g, m, v, None, numba_kernels._plain(scalars))
    else:
        numba_kernels._radam_word_pair_loop(p, g, m, v, None, scalars)


@pytest.mark.parametrize("storage", [(np.float32,) * 3 + (None,), (np.float64,) * 3 + (None,),
                                     (ml_dtypes.bfloat16, ml_dtypes.bfloat16, np.float32, None),
                                     (np.float16, np.float16, np.float32, np.float32),
                                     (ml_dtypes.bfloat16,) * 3 + (None,)],
                         ids=["float32", "float64", "bf16-params-grads", "fp16-master", "all-bfloat16-words"])
@pytest.mark.parametrize("decoupled", [False, True])
def test_the_common_case_loop_equals_the_general_loop_bit_for_bit(storage, decoupled):
    """A rectified, unscaled, unnegated step without L2 decay takes a loop of its own, its flags
    constants (``numba_kernels._plain``); it must give the general loop's bits, specials included
    (all-bfloat16: the word-pair loop). That the kernels take it only where it applies, the
    oracle tests of every option show."""
    math = np.float64 if storage[0] is np.float64 else np.float32
    scalars = step_scalars(step=9, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1 * decoupled,
                           decoupled_weight_decay=decoupled, maximize=False)
    table = pack_rows([scalars], np.dtype(math))
    plain = _storage_buffers(storage, 4099, seed=5)
    general = [None if b is None else b.copy() for b in plain]
    if storage[3] is None and all(d is ml_dtypes.bfloat16 for d in storage[:3]):
        for buffers, flag in ((plain, True), (general, False)):
            _word_pair_loops(*(b[:-1].view(np.uint32) for b in buffers[:4]), *table, flag)
    else:
        _element_loops(*plain, *table, True)
        _element_loops(*general, *table, False)
    for got, want in zip(plain, general):
        if got is not None:
            assert got.tobytes() == want.tobytes()


def _widest_register(registers: list[str]) -> str | None:
    return max(registers, key="xyz".index) if registers else None


@pytest.mark.parametrize("storage", ["float32", "bf16-params-grads", "fp16-master-bf16-moments"])
def test_float32_math_is_vectorised_and_stays_float32(storage):
    """On any CPU: the element loop becomes float32 vector square roots, nothing is computed in
    float64, and on x86 the widest packed square root uses the width the kernel asks for
    (``VECTOR_BITS``) where the CPU has it, else the CPU's widest."""
    ir, asm = kernel_code.compiled(storage)
    lanes, registers = kernel_code.packed_sqrt_widths(ir, asm)
    assert lanes, "no float32 vector sqrt: the loop did not vectorise"
    assert not kernel_code.promoted_to_float64(ir), "float32 math promoted to float64"
    if numba_target.is_x86():
        chosen = numba_target.chosen_vector_bits(numba_kernels.VECTOR_BITS)
        assert _widest_register(registers) == kernel_code.REGISTER[chosen], (registers, chosen)


def test_all_bfloat16_buffers_get_the_vectorised_word_loop():
    """With every buffer bfloat16 the kernel holds a loop over 32-bit words (two elements each),
    vectorised: wide i32 loads that the 16-bit element loop does not have."""
    ir, _ = kernel_code.compiled("all-bfloat16")
    assert re.search(r"load <(vscale x )?(4|8|16|32|64) x i32>", ir), "no vectorised 32-bit word loop for bfloat16 buffers"


def _assert_explicit_avx512_loop(code: dict) -> None:
    """The hardware conversion in each of the 12 loop variants, every converted vector class-tested."""
    assert code["bf16_conversions"] >= 12, "expected the hardware conversion in each of 12 loop variants"
    assert code["class_tests"] == 2 * code["bf16_conversions"], "every converted vector must be class-tested"


@pytest.mark.skipif(not bf16_lanes.available(), reason="no AVX512-F/BW/DQ/BF16 on this CPU: all words take the scalar loop")
def test_all_bfloat16_buffers_get_the_explicit_avx512_loop():
    """Where the CPU has AVX512-BF16, the word loop's leading words take the explicit vector code:
    the hardware conversion, guarded by the NaN/subnormal class test, in each of the 12 variants."""
    _assert_explicit_avx512_loop(kernel_code.summary(["all-bfloat16"])["all-bfloat16"])


#: The storages compiled for each other target (each costs a fresh compile): float32 everywhere,
#: and where the target has something of its own to show: float16 storage without F16C, 16-bit
#: params at 256 bits, the explicit AVX-512 bfloat16 loop.
PROBED = {"x86-64-v2 (SSE4.2, no F16C)": ["float32", "fp16-master-bf16-moments"],
          "AVX2 (haswell)": ["float32", "bf16-params-grads"],
          "Intel Sapphire/Emerald Rapids (AVX-512 + BF16)": ["float32", "all-bfloat16"],
          "Intel Skylake-SP (AVX-512, downclocks under it)": ["float32"]}


@pytest.fixture(scope="module")
def other_cpus_code(tmp_path_factory):
    """:func:`kernel_code.summary` of the :data:`PROBED` storages compiled (not run) for each of
    :data:`cpu_targets.TARGETS`, in fresh processes, all at once."""
    root = Path(__file__).resolve().parents[1]
    runs = {name: subprocess.Popen([sys.executable, "-m", "tests.kernel_code", *PROBED[name]], cwd=root,
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env=cpu_targets.environment(name, str(tmp_path_factory.mktemp("cache"))))
            for name in cpu_targets.TARGETS}
    out = {}
    try:
        for name, run in runs.items():
            stdout, stderr = run.communicate(timeout=600)
            assert run.returncode == 0, f"compiling for {name} failed:\n{stderr[-4000:]}"
            out[name] = json.loads(stdout)
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.communicate()
    return out


@pytest.mark.skipif(not numba_target.is_x86(), reason="the x86 targets are compiled for on an x86 machine")
@pytest.mark.parametrize("target", cpu_targets.TARGETS)
def test_every_x86_target_gets_the_vectors_the_kernels_choose(target, other_cpus_code):
    """Compiled for each x86 CPU the users run: the storages probed vectorised at the width the kernels
    choose there (512 bits on Sapphire/Emerald Rapids too, whose tuning alone takes 256, as it
    still does on Skylake-SP: the control), nothing in float64, float16 storage compiled where
    the CPU has no half conversions, the explicit AVX-512 bfloat16 loop exactly where
    AVX512-BF16 is."""
    code = other_cpus_code[target]
    _, features, widest, chosen = cpu_targets.TARGETS[target]
    assert code["widest_vector_bits"] == widest
    for storage in PROBED[target]:
        assert code[storage]["sqrt_lanes"] and not code[storage]["float64"], storage
        assert _widest_register(code[storage]["sqrt_registers"]) == kernel_code.REGISTER[chosen], storage
        if storage != "all-bfloat16":
            assert code[storage]["bf16_conversions"] == 0
    assert code["lanes_available"] == ("avx512bf16" in features)
    if "all-bfloat16" in code:
        _assert_explicit_avx512_loop(code["all-bfloat16"])


@pytest.mark.skipif(not bf16_lanes.available(), reason="no AVX512-BF16 here: this run already takes the scalar loop")
def test_cpus_without_avx512_bf16_step_every_bfloat16_word_in_the_scalar_loop(tmp_path):
    """Compiled for this CPU minus AVX512-BF16 (fresh processes, Numba told so), the explicit
    vector code is left out, and the all-bfloat16 bit-for-bit tests pass with every word in the
    scalar loop: all 12 variants, every alignment and entry point."""
    features = llvmlite.binding.get_host_cpu_features()
    features["avx512bf16"] = False
    env = {**os.environ, "NUMBA_CPU_FEATURES": features.flatten(), "NUMBA_CACHE_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", "from fastradam.backends.numba import bf16_lanes; assert not bf16_lanes.available()"],
                   env=env, cwd=root, check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_mixed_precision.py",
                    "-k", "vector_code or pairs_any_alignment"], env=env, cwd=root, check=True, timeout=900)
