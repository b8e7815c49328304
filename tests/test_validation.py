"""Bad input: the right exception, a message naming the argument, and no byte written."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fastradam import fused_step
from tests.cases import random_buffers

N = 33


def _buffers(dtype=np.float32):
    return list(random_buffers(N, dtype, seed=5))


def _assert_rejected(buffers, error, match, **hyper):
    snapshot = [np.array(b, copy=True) for b in buffers if isinstance(b, np.ndarray)]
    with pytest.raises(error, match=match):
        fused_step(*buffers, **{"step": 10, **hyper})
    after = [b for b in buffers if isinstance(b, np.ndarray)]
    for before, now in zip(snapshot, after):
        assert before.tobytes() == now.tobytes(), "a rejected call wrote to a buffer"


@pytest.mark.parametrize("position,name", list(enumerate(["params", "grads", "exp_avg", "exp_avg_sq"])))
@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, None, "x"], ids=repr)
def test_non_arrays_are_type_errors(position, name, bad):
    buffers = _buffers()
    buffers[position] = bad
    _assert_rejected(buffers, TypeError, name)


@pytest.mark.parametrize("position,name", list(enumerate(["params", "grads", "exp_avg", "exp_avg_sq"])))
def test_masked_arrays_are_type_errors(position, name):
    """An in-place step cannot honour a mask: refused rather than stepping the masked elements."""
    buffers = _buffers()
    buffers[position] = np.ma.masked_array(buffers[position], mask=np.arange(N) % 2 == 0)
    snapshot = [np.asarray(b).copy() for b in buffers]  # np.asarray: a masked array's data, mask ignored
    with pytest.raises(TypeError, match=f"{name} must be a NumPy array .* got numpy\\.ma\\..*MaskedArray"):
        fused_step(*buffers, step=10)
    assert all(before.tobytes() == np.asarray(now).tobytes() for before, now in zip(snapshot, buffers))


@pytest.mark.parametrize("position,name", list(enumerate(["params", "grads", "exp_avg", "exp_avg_sq"])))
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.complex64, np.bool_])
def test_non_float_dtypes_are_type_errors(position, name, dtype):
    buffers = _buffers()
    buffers[position] = buffers[position].astype(dtype)
    _assert_rejected(buffers, TypeError, f"{name} must have dtype float32, float64, bfloat16 or float16")


def test_float64_is_all_or_nothing():
    buffers = _buffers()
    buffers[2] = buffers[2].astype(np.float64)
    _assert_rejected(buffers, TypeError, "params has dtype float32 but exp_avg is float64: float64 storage is all-float64")


def test_moments_share_one_dtype_of_float32_or_bfloat16():
    buffers = _buffers()
    buffers[3] = buffers[3].astype(ml_dtypes.bfloat16)
    _assert_rejected(buffers, TypeError, "exp_avg_sq has dtype bfloat16 but exp_avg has float32")
    buffers = _buffers()
    buffers[2], buffers[3] = buffers[2].astype(np.float16), buffers[3].astype(np.float16)
    _assert_rejected(buffers, TypeError, "exp_avg must be float32 or bfloat16, got float16; supported storage:")


def test_master_weights_only_beside_16_bit_params():
    buffers = _buffers()
    _assert_rejected(buffers, TypeError, "master_params is for bfloat16/float16 params, but params is float32",
                     master_params=buffers[0].copy())
    buffers[0] = buffers[0].astype(ml_dtypes.bfloat16)
    _assert_rejected(buffers, TypeError, "master_params must be float32, got float64",
                     master_params=buffers[1].astype(np.float64))
    _assert_rejected(buffers, ValueError, "master_params has shape",
                     master_params=np.ones(N + 1, np.float32))
    _assert_rejected(buffers, ValueError, "grads and master_params share memory", master_params=buffers[1])


@pytest.mark.parametrize("grad_scale,error", [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                              ("2", TypeError)])
def test_bad_grad_scale(grad_scale, error):
    _assert_rejected(_buffers(), error, "grad_scale must be", grad_scale=grad_scale)


@pytest.mark.parametrize("found_inf,error,match", [
    ("yes", TypeError, "found_inf must be"),
    (np.array([True, False]), ValueError, "found_inf must be a bool or a 0-d array"),
])
def test_bad_found_inf(found_inf, error, match):
    _assert_rejected(_buffers(), error, match, found_inf=found_inf)


def test_check_finite_must_be_a_bool():
    _assert_rejected(_buffers(), TypeError, "check_finite must be a bool", check_finite=1)


@pytest.mark.parametrize("position,name", [(1, "grads"), (3, "exp_avg_sq")])
def test_shape_mismatch_is_a_value_error(position, name):
    buffers = _buffers()
    buffers[position] = buffers[position][:-1].copy()
    _assert_rejected(buffers, ValueError, f"{name} has shape")


def test_same_size_different_shape_is_a_value_error():
    buffers = _buffers()
    buffers = [b[:32].copy() for b in buffers]
    buffers[0] = buffers[0].reshape(4, 8)
    _assert_rejected(buffers, ValueError, "grads has shape")


@pytest.mark.parametrize("position,name", list(enumerate(["params", "grads", "exp_avg", "exp_avg_sq"])))
def test_non_contiguous_is_a_value_error(position, name):
    buffers = [np.repeat(b, 2) for b in _buffers()]
    buffers = [b[:N].copy() for b in buffers]
    wide = np.repeat(buffers[position], 2)
    buffers[position] = wide[::2]
    _assert_rejected(buffers, ValueError, f"{name} must be C-contiguous")


@pytest.mark.parametrize("position,name", [(0, "params"), (2, "exp_avg"), (3, "exp_avg_sq")])
def test_read_only_written_buffers_are_value_errors(position, name):
    buffers = _buffers()
    buffers[position].flags.writeable = False
    _assert_rejected(buffers, ValueError, f"{name} is read-only")


def test_read_only_grads_are_fine():
    buffers = _buffers()
    buffers[1].flags.writeable = False
    fused_step(*buffers, step=3)


@pytest.mark.parametrize("a,b", [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
def test_shared_memory_is_a_value_error(a, b):
    names = ["params", "grads", "exp_avg", "exp_avg_sq"]
    buffers = _buffers()
    buffers[b] = buffers[a]
    _assert_rejected(buffers, ValueError, f"{names[a]} and {names[b]} share memory")


def test_partial_overlap_is_a_value_error():
    base = np.random.default_rng(0).random(2 * N).astype(np.float32)
    buffers = _buffers()
    buffers[0], buffers[3] = base[:N], base[N - 1:2 * N - 1]
    _assert_rejected(buffers, ValueError, "params and exp_avg_sq share memory")


def test_adjacent_views_of_one_allocation_are_fine():
    base = np.random.default_rng(0).random(4 * N)
    views = [base[i * N:(i + 1) * N] for i in range(4)]
    views[3] = np.abs(views[3])
    fused_step(*views, step=2)


BAD_HYPERPARAMETERS = [
    ({"step": 0}, ValueError, "step must be >= 1"),
    ({"step": -3}, ValueError, "step must be >= 1"),
    ({"step": 10**400}, ValueError, r"step must be >= 1 and <= 2\*\*53"),
    ({"step": 2.0}, TypeError, "step must be an int"),
    ({"step": True}, TypeError, "step must be an int"),
    ({"step": "1"}, TypeError, "step must be an int"),
    ({"lr": -1e-3}, ValueError, "lr must be finite and >= 0"),
    ({"lr": float("nan")}, ValueError, "lr must be finite"),
    ({"lr": float("inf")}, ValueError, "lr must be finite"),
    ({"lr": "0.1"}, TypeError, "lr must be a real number"),
    ({"lr": 1j}, TypeError, "lr must be a real number"),
    ({"eps": -1e-8}, ValueError, "eps must be finite and >= 0"),
    ({"eps": float("inf")}, ValueError, "eps must be finite"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be finite and >= 0"),
    ({"weight_decay": float("nan")}, ValueError, "weight_decay must be finite"),
    ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\)"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\)"),
    ({"betas": (-0.1, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\)"),
    ({"betas": (0.9, float("nan"))}, ValueError, r"betas\[1\] must be in \[0, 1\)"),
    ({"betas": (0.9,)}, TypeError, "betas must be a pair"),
    ({"betas": 0.9}, TypeError, "betas must be a pair"),
    ({"betas": (0.9, "0.999")}, TypeError, r"betas\[1\] must be a real number"),
    ({"decoupled_weight_decay": 1}, TypeError, "decoupled_weight_decay must be a bool"),
    ({"maximize": "yes"}, TypeError, "maximize must be a bool"),
]


@pytest.mark.parametrize("hyper,error,match", BAD_HYPERPARAMETERS, ids=lambda x: repr(x))
def test_bad_hyperparameters(hyper, error, match):
    _assert_rejected(_buffers(), error, match, **hyper)


def test_numpy_scalars_are_accepted():
    fused_step(*_buffers(), step=np.int64(7), lr=np.float32(1e-3), betas=(np.float64(0.9), 0.99),
               maximize=np.bool_(False))


def test_a_host_array_beside_a_device_like_array_is_refused():
    class FakeCudaArray:
        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA

    buffers = _buffers()
    buffers[2] = FakeCudaArray()
    _assert_rejected(buffers, TypeError, "all buffers must be on one device")


def test_a_host_array_step_is_refused_on_the_cpu():
    _assert_rejected(_buffers(), TypeError, "step must be an int", step=np.array(3))


@pytest.mark.parametrize("position,name", [(0, "params"), (1, "grads")])
def test_non_native_byte_order_is_a_type_error(position, name):
    buffers = _buffers()
    buffers[position] = buffers[position].astype(buffers[position].dtype.newbyteorder())
    _assert_rejected(buffers, TypeError, f"{name} must have dtype .* got float32 \\(non-native byte order\\)")
