"""Every CUDA source compiles through NVRTC, without a device, for sm_80 and sm_90, warning-free.

Uses CuPy's own NVRTC binding, the compiler the backend's ``RawModule`` uses at run time, with
the backend's options and every template instantiation it launches (every storage combination).
NVRTC comes from the pip ``nvidia-cuda-nvrtc`` wheel and ``cuda_bf16.h``/``cuda_fp16.h`` from the
pip ``nvidia-cuda-runtime`` wheel, which ``cuda-pathfinder`` (a CuPy dependency) finds in
site-packages; no CUDA toolkit, driver or GPU is needed.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("cupy", reason="the CUDA backend's compile check needs CuPy (the 'test' extra)")
from cupy_backends.cuda.libs import nvrtc  # noqa: E402

from fastradam.backends import cuda  # noqa: E402

ARCHS = ("sm_80", "sm_90")
#: CuPy appends -ftz=true to the options of every compilation; compile as it will.
CUPY_OPTIONS = ("-ftz=true",)
#: The instantiations each kernel source must provide.
NAME_EXPRESSIONS = {cuda.KERNEL_FILE: cuda.NAME_EXPRESSIONS}


def compile_program(source_name: str, arch: str, names, *, ptx: bool = False) -> tuple[bytes, dict]:
    """Compile one kernel source; return its CUBIN (or PTX) and the lowered name of each expression."""
    source = (cuda.kernel_dir() / source_name).read_text()
    program = nvrtc.createProgram(source, source_name, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        target = arch.replace("sm_", "compute_") if ptx else arch
        options = [f"-arch={target}", *cuda.compile_options(), *CUPY_OPTIONS]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            pytest.fail(f"{source_name} failed for {arch}: {error}\n{nvrtc.getProgramLog(program)}")
        log = nvrtc.getProgramLog(program)
        assert log.strip() == "", f"{source_name} compiled for {arch} with diagnostics:\n{log}"
        lowered = {name: nvrtc.getLoweredName(program, name) for name in names}
        return (nvrtc.getPTX(program) if ptx else nvrtc.getCUBIN(program)), lowered
    finally:
        nvrtc.destroyProgram(program)


def test_every_source_has_its_instantiations_listed():
    assert sorted(p.name for p in cuda.kernel_dir().glob("*.cu")) == sorted(NAME_EXPRESSIONS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source_name", sorted(NAME_EXPRESSIONS))
def test_source_compiles_every_instantiation_without_warnings(source_name, arch):
    binary, lowered = compile_program(source_name, arch, NAME_EXPRESSIONS[source_name])
    assert binary
    assert all(lowered.values()) and len(set(lowered.values())) == len(lowered)


def test_backend_instantiates_every_storage_combination():
    # flat, segments, tensors, capturable and capturable-segments kernels per storage combination (no capturable
    # ones under stochastic rounding), plus the three gradient pre-passes (check_finite, clipping norm) per
    # gradient storage
    assert len(cuda.STORAGE_COMBINATIONS) == 43
    stochastic = sum(storage.stochastic for storage in cuda.STORAGE_COMBINATIONS)
    assert stochastic == 6
    expected = 5 * len(cuda.STORAGE_COMBINATIONS) - 2 * stochastic + 3 * len(cuda.STORAGE_TYPES)
    assert len(set(cuda.NAME_EXPRESSIONS)) == len(cuda.NAME_EXPRESSIONS) == expected


@pytest.mark.parametrize("keeping,keeper", (({}, "RoundNearest"), ({"master": True}, "FloatMaster"),
                                            ({"remainders": True}, "Remainders"),
                                            ({"stochastic": True}, "RoundStochastic")))
def test_the_keeper_is_the_last_template_argument(keeping, keeper):
    storage = cuda.Storage("bfloat16", "bfloat16", "float32", **keeping)
    names = cuda.name_expressions(storage)
    assert cuda.kernel_name("tensors", storage) == (f"fastradam::radam_step_tensors<fastradam::bfloat16_t, "
                                                     f"fastradam::bfloat16_t, float, fastradam::{keeper}>")
    assert any("capturable" in name for name in names) == (keeper != "RoundStochastic")


def test_cuda_headers_come_from_the_pip_runtime_wheel_or_a_toolkit():
    include = cuda.cuda_include_dir()
    assert include is not None, "pip install nvidia-cuda-runtime: the kernels include cuda_bf16.h/cuda_fp16.h"
    assert f"-I{include}" in cuda.compile_options()


VECTOR_OPS = re.compile(r"\b(?:ld|st)\.global(?:\.nc)?\.v(\d)\.(?:f32|u32|b32|f64|u64|b64)\b")
#: What the CPU harness cannot run: it runs every (block, thread) pair in turn, so no kernel may wait for another thread.
SYNCHRONISING_OPS = re.compile(r"\b(?:bar|barrier)\.\w+|\b(?:shfl|vote|match|redux)\.|\bnanosleep\b")


#: The start of a top-level PTX definition: a kernel (.entry) or a device function (.func, e.g. the
#: math library's pow, whose own fused multiply-adds are its rounding, not a contraction).
DEFINITION = re.compile(r"(?m)^[ \t]*(?:\.(?:visible|weak|extern)[ \t]+)*\.(entry|func)[ \t]+(?:\([^)]*\)[ \t]*)?([\w$]+)")


def ptx_entries(ptx: str) -> dict[str, str]:
    """Each kernel's own PTX text (up to the next top-level definition), by its lowered name."""
    starts = [(m.start(), m.group(1), m.group(2)) for m in DEFINITION.finditer(ptx)]
    ends = [start for start, _, _ in starts[1:]] + [len(ptx)]
    return {name: ptx[start:end] for (start, kind, name), end in zip(starts, ends) if kind == "entry"}


def test_kernels_use_16_byte_vectors_no_fma_and_never_synchronise():
    """Every update kernel of every storage combination moves 16-byte vectors (v4 of 32-bit or
    v2 of 64-bit words) for loads and stores, and every gradient pre-pass for its loads; none
    contracts a multiply-add or synchronises (no barrier, shuffle or vote: the CPU harness runs
    threads one after another); the pre-passes gather the clipping norm through atomic arrival
    counters behind memory fences, their reduction tree's loads unrolled into registers (no local
    memory) (one PTX build of them all; the PTX is the same for both architectures)."""
    updates = [cuda.kernel_name(kind, storage) for storage in cuda.STORAGE_COMBINATIONS
               for kind in ("step", "segments", "tensors")]
    prepasses = sorted({cuda.kernel_name(kind, storage) for storage in cuda.STORAGE_COMBINATIONS
                        for kind in cuda.PREPASS_KERNELS})
    assert len(prepasses) == 3 * len(cuda.STORAGE_TYPES)
    ptx, lowered = compile_program(cuda.KERNEL_FILE, "sm_90", updates + prepasses, ptx=True)
    entries = ptx_entries(ptx.decode())
    for name in updates + prepasses:
        text = entries[lowered[name]]
        ops = [m.group(0) for m in VECTOR_OPS.finditer(text)]
        assert any(op.startswith("ld.") for op in ops), (name, ops)
        assert name in prepasses or any(op.startswith("st.") for op in ops), (name, ops)
        assert "fma." not in text, f"{name}: --fmad=false must keep multiply-adds uncontracted"
        assert not SYNCHRONISING_OPS.search(text), f"{name} synchronises: {SYNCHRONISING_OPS.search(text).group(0)}"
    for name in prepasses:
        text = entries[lowered[name]]
        assert "atom.global.add.u32" in text and "membar.gl" in text and "ld.volatile.global.f64" in text, name
        assert not re.search(r"\b(?:ld|st)\.local\b", text), f"{name}: the tree's loads must stay in registers"


def test_kernel_source_carries_the_header_hash():
    source = cuda.kernel_source()
    assert source.startswith((cuda.kernel_dir() / cuda.KERNEL_FILE).read_text())
    assert re.search(r"// headers sha256 [0-9a-f]{64}\n$", source)
