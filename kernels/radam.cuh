// RAdam math shared by the CUDA kernels (radam.cu) and the CPU test harness: the per-element
// update and the per-step scalars, all __host__ __device__ and free of CUDA-only constructs.
//
// The formulas mirror fastradam/scalars.py operation for operation, so that, compiled without
// FMA contraction (nvcc/NVRTC --fmad=false, g++ -ffp-contract=off), the GPU, the host harness
// and the Numba backend round identically.
#pragma once

#include "generated/abi.cuh"

namespace fastradam {

//! Storage tags of the 16-bit formats: the kernels see their bit patterns (the backend passes
//! uint16 views for bfloat16, int16 views for float16, as the Numba backend does).
struct bfloat16_t {
    unsigned short bits;
};
struct float16_t {
    unsigned short bits;
};

//! The arithmetic type of a step over params P, grads G and moments Mo: double only when all
//! three are double; float otherwise (any 16-bit or float32 storage).
template <typename P, typename G, typename Mo>
struct MathType {
    using type = float;
};
template <>
struct MathType<double, double, double> {
    using type = double;
};

__host__ __device__ __forceinline__ unsigned float_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    unsigned u;
    __builtin_memcpy(&u, &x, sizeof u);
    return u;
#endif
}

__host__ __device__ __forceinline__ float float_from_bits(unsigned u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float x;
    __builtin_memcpy(&x, &u, sizeof x);
    return x;
#endif
}

// Bit-exact conversions, written out in integer arithmetic: used by the CPU harness (g++ has
// neither cuda_bf16.h nor cuda_fp16.h) and checked there against ml_dtypes/NumPy astype over
// every 16-bit pattern and millions of float32 values. On the device radam.cu uses the CUDA
// intrinsics instead (FASTRADAM_CUDA_FP_INTRINSICS), which agree except for NaN payloads.

//! bfloat16 bits widened to float32: exact (the top half of the float32 pattern).
__host__ __device__ __forceinline__ float bfloat16_bits_to_float(unsigned short h) {
    return float_from_bits(static_cast<unsigned>(h) << 16);
}

//! float32 rounded to bfloat16 bits, to nearest even; overflow rounds to infinity; a NaN
//! becomes the quiet NaN of its sign (0x7FC0 / 0xFFC0), as ml_dtypes does.
__host__ __device__ __forceinline__ unsigned short float_to_bfloat16_bits(float x) {
    const unsigned u = float_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<unsigned short>(((u >> 16) & 0x8000u) | 0x7FC0u);
    return static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

//! IEEE binary16 bits widened to float32: exact (subnormals normalised, NaN payload kept).
__host__ __device__ __forceinline__ float float16_bits_to_float(unsigned short h) {
    const unsigned sign = (static_cast<unsigned>(h) & 0x8000u) << 16;
    unsigned exponent = (h >> 10) & 0x1Fu;
    unsigned mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));
    if (exponent == 0) {
        if (mantissa == 0) return float_from_bits(sign);
        exponent = 127 - 14;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            --exponent;
        }
        return float_from_bits(sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13));
    }
    return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

//! float32 rounded to IEEE binary16 bits, to nearest even, subnormals included; >= 65520 in
//! magnitude becomes infinity; a NaN keeps its sign and top payload bits (NumPy's rule).
__host__ __device__ __forceinline__ unsigned short float_to_float16_bits(float x) {
    const unsigned u = float_bits(x);
    const unsigned sign = (u >> 16) & 0x8000u;
    const unsigned a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) {
        const unsigned nan = 0x7C00u | ((a & 0x7FFFFFu) >> 13);
        return static_cast<unsigned short>(sign | (nan == 0x7C00u ? 0x7C01u : nan));
    }
    if (a >= 0x477FF000u) return static_cast<unsigned short>(sign | 0x7C00u);  // 65520 and up
    if (a >= 0x38800000u) {                                                     // normal: >= 2^-14
        return static_cast<unsigned short>(sign | ((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
    }
    if (a <= 0x33000000u) return static_cast<unsigned short>(sign);  // <= 2^-25: ties to even zero
    const unsigned shift = 126u - (a >> 23);                          // 14 .. 24
    const unsigned mantissa = (a & 0x7FFFFFu) | 0x800000u;
    unsigned q = mantissa >> shift;
    const unsigned rest = mantissa & ((1u << shift) - 1u);
    const unsigned half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (q & 1u))) ++q;
    return static_cast<unsigned short>(sign | q);
}

//! A stored value in math type M.
template <typename M>
__host__ __device__ __forceinline__ M load_as(float x) { return static_cast<M>(x); }
template <typename M>
__host__ __device__ __forceinline__ M load_as(double x) { return static_cast<M>(x); }
template <typename M>
__host__ __device__ __forceinline__ M load_as(bfloat16_t x) {
#if defined(FASTRADAM_CUDA_FP_INTRINSICS)
    return __bfloat162float(__ushort_as_bfloat16(x.bits));
#else
    return bfloat16_bits_to_float(x.bits);
#endif
}
template <typename M>
__host__ __device__ __forceinline__ M load_as(float16_t x) {
#if defined(FASTRADAM_CUDA_FP_INTRINSICS)
    return __half2float(__ushort_as_half(x.bits));
#else
    return float16_bits_to_float(x.bits);
#endif
}

//! A math value rounded (to nearest even) to storage type T.
template <typename T>
struct StoreAs {
    template <typename M>
    __host__ __device__ __forceinline__ static T from(M x) { return static_cast<T>(x); }
};
template <>
struct StoreAs<bfloat16_t> {
    __host__ __device__ __forceinline__ static bfloat16_t from(float x) {
#if defined(FASTRADAM_CUDA_FP_INTRINSICS)
        return bfloat16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
        return bfloat16_t{float_to_bfloat16_bits(x)};
#endif
    }
};
template <>
struct StoreAs<float16_t> {
    __host__ __device__ __forceinline__ static float16_t from(float x) {
#if defined(FASTRADAM_CUDA_FP_INTRINSICS)
        return float16_t{__half_as_ushort(__float2half_rn(x))};
#else
        return float16_t{float_to_float16_bits(x)};
#endif
    }
};
template <typename T, typename M>
__host__ __device__ __forceinline__ T store_as(M x) { return StoreAs<T>::from(x); }

//! Whether a stored value is finite (exponent bits not all ones).
__host__ __device__ __forceinline__ bool is_finite(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }
__host__ __device__ __forceinline__ bool is_finite(double x) {
#if defined(__CUDA_ARCH__)
    const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(x));
#else
    unsigned long long u;
    __builtin_memcpy(&u, &x, sizeof u);
#endif
    return (u & 0x7FF0000000000000ull) != 0x7FF0000000000000ull;
}
__host__ __device__ __forceinline__ bool is_finite(bfloat16_t x) { return (x.bits & 0x7F80u) != 0x7F80u; }
__host__ __device__ __forceinline__ bool is_finite(float16_t x) { return (x.bits & 0x7C00u) != 0x7C00u; }

//! The scalars of step `step` (1-based) for one group, in float64: fastradam.scalars.step_scalars
//! on the device, operation for operation.
//!
//! bc1 = 1 - beta1^t, bc2 = 1 - beta2^t, rho_inf = 2/(1-beta2) - 1,
//! rho_t = rho_inf - 2 t beta2^t / bc2; RECTIFIED when the flavour rectifies rho_t (rho_t >
//! threshold, >= when inclusive), then step_size = lr r_t sqrt(bc2) / bc1 with
//! r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t)); else MOMENTUM with
//! lr / bc1, or HOLD with 0 (and no decoupled decay). eps is scaled by sqrt(bc2) when the flavour
//! adds it to sqrt(v_hat), eps_root by bc2. The step must be >= 1; it is not checked (the
//! capturable kernels cannot raise).
__host__ __device__ inline ElementScalars<double> radam_step_scalars(double step, double lr, const GroupRow& group) {
    const double bias_correction1 = 1.0 - pow(group.beta1, step);
    const double bias_correction2 = 1.0 - pow(group.beta2, step);
    const double rho_inf = 2.0 / (1.0 - group.beta2) - 1.0;
    const double beta2_t = pow(group.beta2, step);
    const double rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t);
    int mode;
    double step_size;
    if (group.inclusive ? rho_t >= group.threshold : rho_t > group.threshold) {
        mode = kRectified;
        const double rect =
            sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
        step_size = lr * rect * sqrt(bias_correction2) / bias_correction1;
    } else {
        mode = group.hold_below ? kHold : kMomentum;
        step_size = mode == kMomentum ? lr / bias_correction1 : 0.0;
    }
    const bool decays = group.decoupled && mode != kHold;
    return ElementScalars<double>{1.0 - group.beta1,
                                  group.beta2,
                                  1.0 - group.beta2,
                                  group.eps_on_v_hat ? group.eps * sqrt(bias_correction2) : group.eps,
                                  group.eps_root * bias_correction2,
                                  group.decoupled ? 0.0 : group.weight_decay,
                                  decays ? 1.0 - lr * group.weight_decay : 1.0,
                                  step_size,
                                  group.inv_grad_scale,
                                  group.maximize ? 1 : 0,
                                  mode};
}

//! One element of the RAdam update, in place on (p, m, v), in math type M, in exactly the
//! operation order of the Numba backend's _radam_element:
//!
//!     g = g * inv_grad_scale;  g = -g if negate_grad;  g = g + l2_weight_decay * p (when nonzero)
//!     m = m + (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g g
//!     p = p * param_decay - step_size m / (sqrt(v + eps_root) + eps)   RECTIFIED (no add when eps_root is 0)
//!     p = p * param_decay - step_size m                     MOMENTUM
//!     p unchanged                                           HOLD
template <typename M>
__host__ __device__ __forceinline__ void radam_element(M& p, M g, M& m, M& v, const ElementScalars<M>& s) {
    g = g * s.inv_grad_scale;
    if (s.negate_grad) g = -g;
    if (s.l2_weight_decay != M(0)) g = g + s.l2_weight_decay * p;
    m = m + s.one_minus_beta1 * (g - m);
    v = s.beta2 * v + s.one_minus_beta2 * g * g;
    if (s.mode == kRectified) {
        const M root = s.eps_root != M(0) ? sqrt(v + s.eps_root) : sqrt(v);
        p = p * s.param_decay - s.step_size * m / (root + s.eps);
    } else if (s.mode != kHold) {
        p = p * s.param_decay - s.step_size * m;
    }
}

}  // namespace fastradam
