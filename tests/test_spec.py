"""The declared contract: the generated ABI header is fresh, its records lay out as the NumPy
records that stand for them, and every signature's defaults are the option table's."""

from __future__ import annotations

import ctypes
import inspect

import numpy as np
import pytest

import cuda_harness
import fastradam
import fastradam.torch
from fastradam import abi_header, api, options, spec
from fastradam.backends.cuda import launch
from fastradam.reference import reference_step
from fastradam.scalars import StepScalars
from fastradam.storage import FORMATS, SUPPORTED, Storage, check_storage


def test_generated_header_is_fresh():
    assert abi_header.HEADER.read_text() == abi_header.header(), "run python -m fastradam.abi_header"


def test_header_lists_every_field_and_storage():
    text = abi_header.header()
    for field in (*spec.SCALARS, *spec.GROUP_ROW):
        assert f" {field.name};" in text
    for storage in SUPPORTED:
        assert f"X({storage.short}," in text
    assert f"kScalarFloats = {len(spec.SCALAR_FLOATS)};" in text


@pytest.mark.skipif(cuda_harness.compiler() is None, reason="no host C++ compiler (g++ or $CXX)")
def test_abi_records_lay_out_as_the_c_structs():
    """ElementScalars<float>, ElementScalars<double> and GroupRow as g++ lays them out (the layout
    NVRTC uses too: both follow the platform ABI) against the NumPy records passed by value."""
    out = np.zeros(64, dtype=np.int64)
    count = cuda_harness.build().abi_layout(ctypes.c_void_p(out.ctypes.data))
    expected = []
    for record in (launch.scalars_dtype(np.dtype(np.float32)), launch.scalars_dtype(np.dtype(np.float64)),
                   launch.GROUP_DTYPE):
        expected += [record.itemsize, *(record.fields[name][1] for name in record.names)]
    assert out[:count].tolist() == expected


def test_a_record_carries_the_table_row():
    floats = np.arange(len(spec.SCALAR_FLOATS), dtype=np.float32)[None] + 0.5
    ints = np.array([[1, 2, -(2**31), 2**31 - 1]], dtype=np.int32)  # the round keys: any int32 bit pattern
    assert spec.SCALAR_INTS == ("negate_grad", "mode", "round_key_lo", "round_key_hi")
    record = launch.scalars_record(floats, ints)
    assert [float(record[name]) for name in spec.SCALAR_FLOATS] == floats[0].tolist()
    assert [int(record[name]) for name in spec.SCALAR_INTS] == ints[0].tolist()


def _defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("function", [api.fused_step, reference_step, fastradam.torch.RAdam.__init__],
                         ids=lambda f: f.__qualname__)
def test_signature_defaults_are_the_option_table(function):
    defaults = _defaults(function)
    for option in options.OPTIONS:
        if option.name == "betas" or option.name in defaults:
            assert defaults[option.name] == option.default, option.name


def test_step_scalars_are_the_table_columns_in_order():
    """A kernel row is a slice of StepScalars (scalars.pack_rows): its fields must be the columns."""
    assert StepScalars._fields == spec.SCALAR_FLOATS[:-1] + spec.SCALAR_INTS
    assert spec.SCALAR_FLOATS[-1] == "inv_grad_scale"


def test_step_bytes_count_each_buffer_read_and_written():
    """The traffic the benchmarks divide by: fp32 28 B per element, float64 56, the fp32-master
    path over bf16 params 28 (the compact-master issue's baseline), all-bfloat16 14; remainders
    add an int16 read and written (bf16 params, bf16 grads, fp32 moments: 26; all-bfloat16: 18),
    stochastic rounding nothing (it is the plain bfloat16 traffic)."""
    assert Storage("float32", "float32", "float32").step_bytes == 28
    assert Storage("float64", "float64", "float64").step_bytes == 56
    assert Storage("bfloat16", "bfloat16", "float32", True).step_bytes == 28
    assert Storage("bfloat16", "bfloat16", "bfloat16").step_bytes == 14
    assert Storage("float16", "float32", "bfloat16", True).step_bytes == 2 + 8 + 4 + 8
    assert Storage("bfloat16", "bfloat16", "float32", remainders=True).step_bytes == 26
    assert Storage("bfloat16", "bfloat16", "bfloat16", remainders=True).step_bytes == 18
    assert Storage("bfloat16", "float32", "float32", remainders=True).step_bytes == 2 + 2 + 4 + 4 + 16
    assert Storage("bfloat16", "bfloat16", "float32", stochastic=True).step_bytes == 22
    assert Storage("bfloat16", "bfloat16", "bfloat16", stochastic=True).step_bytes == 14


def test_every_option_is_a_group_field():
    fields = set(options.GroupOptions.__dataclass_fields__)
    for option in options.OPTIONS:
        assert option.name in fields or option.name == "betas"


def test_checked_options_are_cached_by_type_as_well_as_value():
    assert options.check_group({"maximize": True}).maximize is True
    with pytest.raises(TypeError, match="maximize must be a bool"):
        options.check_group({"maximize": 1})
    assert options.check_group({"betas": (0.0, 0.5)}).beta1 == 0.0
    with pytest.raises(TypeError, match=r"betas\[0\] must be a real number"):
        options.check_group({"betas": (False, 0.5)})
    with pytest.raises(ValueError, match="eps_root must be finite and >= 0"):
        options.check_group({"eps_root": -1e-8})


def test_supported_storage_follows_the_rule():
    assert len(SUPPORTED) == 43
    assert len(set(SUPPORTED)) == len({s.short for s in SUPPORTED}) == 43
    assert Storage("float64", "float64", "float64") in SUPPORTED
    assert all(s.moments in ("float32", "bfloat16") or s.params == "float64" for s in SUPPORTED)
    with pytest.raises(TypeError, match="the moments share one dtype"):
        check_storage(("float32", "float32", "float32", "bfloat16"))
    assert {f.short for f in FORMATS.values()} == {"f32", "f64", "bf16", "f16"}


def test_compact_params_are_bfloat16_params_without_a_master():
    """Remainders and stochastic rounding: bfloat16 params, grads in any of the three formats,
    moments both fp32 or both bf16, no master, one or the other: 6 storages each."""
    for flag in ("remainders", "stochastic"):
        kinds = [s for s in SUPPORTED if getattr(s, flag)]
        assert {(s.grads, s.moments) for s in kinds} == {(g, m) for g in ("float32", "bfloat16", "float16")
                                                           for m in ("float32", "bfloat16")}
        assert all(s.params == "bfloat16" and not s.master for s in kinds) and len(kinds) == 6
        assert all(s.short.endswith("_rem" if flag == "remainders" else "_sr") for s in kinds)
    assert not any(s.remainders and s.stochastic for s in SUPPORTED)
    assert Storage("bfloat16", "bfloat16", "float32", remainders=True).short == "bf16_bf16_f32_rem"
    assert Storage("bfloat16", "float16", "bfloat16", stochastic=True).short == "bf16_f16_bf16_sr"
    assert check_storage(("bfloat16",) * 4, remainders="int16") == Storage("bfloat16", "bfloat16", "bfloat16",
                                                                           remainders=True)
    assert check_storage(("bfloat16",) * 4, stochastic=True).stochastic
    for storages, kwargs, match in (
            (("float16", "float16", "float32", "float32"), {"remainders": "int16"}, "is for bfloat16 params"),
            (("float32",) * 4, {"stochastic": True}, "is for bfloat16 params"),
            (("bfloat16",) * 4, {"remainders": "int16", "master": "float32"}, "replaces master_params"),
            (("bfloat16",) * 4, {"remainders": "int16", "stochastic": True}, "exclude each other"),
            (("bfloat16",) * 4, {"remainders": "uint16"}, "must be int16"),
            (("float64",) * 4, {"stochastic": True}, "is for bfloat16 params")):
        with pytest.raises(TypeError, match=match):
            check_storage(storages, **kwargs)
