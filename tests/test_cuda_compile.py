"""Every CUDA source compiles through NVRTC, without a device, for sm_80 and sm_90, warning-free.

Uses CuPy's own NVRTC binding, the compiler the backend's ``RawModule`` uses at run time, with
the backend's options and every template instantiation it launches. NVRTC comes from the pip
``nvidia-cuda-nvrtc`` wheel, which ``cuda-pathfinder`` (a CuPy dependency) finds in
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
        options = [f"-arch={target}", *cuda.COMPILE_OPTIONS, *CUPY_OPTIONS, f"-I{cuda.kernel_dir()}"]
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


def test_backend_instantiates_every_kernel_dtype_step_and_lr_type():
    # flat, segments and tensors kernels, plus the capturable one per step and lr type
    expected = len(cuda.STORAGE_TYPES) * (3 + len(cuda.STEP_TYPES) * len(cuda.LR_TYPES))
    assert len(set(cuda.NAME_EXPRESSIONS)) == len(cuda.NAME_EXPRESSIONS) == expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel_name", (cuda.step_kernel_name, cuda.segments_kernel_name, cuda.tensors_kernel_name))
def test_step_kernels_use_16_byte_vectors_and_no_fma(arch, kernel_name):
    names = [kernel_name(dtype) for dtype in cuda.STORAGE_TYPES]
    ptx, _ = compile_program(cuda.KERNEL_FILE, arch, names, ptx=True)
    text = ptx.decode()
    memory_ops = set(re.findall(r"\b(?:ld|st)\.global(?:\.nc)?\.v\d\.f(?:32|64)\b", text))
    loads = {"ld.global.nc.v4.f32", "ld.global.v4.f32"} & memory_ops  # grads: .nc when provably read-only
    assert loads and "st.global.v4.f32" in memory_ops, memory_ops
    loads = {"ld.global.nc.v2.f64", "ld.global.v2.f64"} & memory_ops
    assert loads and "st.global.v2.f64" in memory_ops, memory_ops
    assert "fma." not in text, "--fmad=false must keep multiply-adds uncontracted"


def test_kernel_source_carries_the_header_hash():
    source = cuda.kernel_source()
    assert source.startswith((cuda.kernel_dir() / cuda.KERNEL_FILE).read_text())
    assert re.search(r"// headers sha256 [0-9a-f]{64}\n$", source)
