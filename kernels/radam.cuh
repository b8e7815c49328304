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

//! The quiet NaN of float32 bits u's sign as bfloat16 bits (sign | 0x7FC0) when u is a NaN, else -1.
__host__ __device__ __forceinline__ int bfloat16_nan_bits(unsigned u) {
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<int>(((u >> 16) & 0x8000u) | 0x7FC0u) : -1;
}

//! bfloat16 bits widened to float32: exact (the top half of the float32 pattern).
__host__ __device__ __forceinline__ float bfloat16_bits_to_float(unsigned short h) {
    return float_from_bits(static_cast<unsigned>(h) << 16);
}

//! float32 rounded to bfloat16 bits, to nearest even; overflow rounds to infinity; a NaN
//! becomes the quiet NaN of its sign (0x7FC0 / 0xFFC0), as ml_dtypes does.
__host__ __device__ __forceinline__ unsigned short float_to_bfloat16_bits(float x) {
    const unsigned u = float_bits(x);
    const int nan = bfloat16_nan_bits(u);
    if (nan >= 0) return static_cast<unsigned short>(nan);
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

// How bfloat16 params keep their fp32 values without an fp32 master (fastradam/rounding.py, the
// spec; fastradam.reference.split_master / stochastic_round_bfloat16, the oracle): integer
// arithmetic only, the same on the device and in the CPU harness.

//! The fp32 master of bfloat16 bits b and int16 remainder r (Transformer Engine's
//! store_param_remainders): X = ((b - (r < 0)) << 16) | uint16(r), exact for every X.
__host__ __device__ __forceinline__ float join_remainder(unsigned short b, short r) {
    const unsigned high = static_cast<unsigned>(b) - (r < 0 ? 1u : 0u);
    return float_from_bits((high << 16) | static_cast<unsigned short>(r));
}

//! The bfloat16 half of fp32 master x (bits X): (X >> 16) + ((X >> 15) & 1), the high half rounded
//! up in magnitude when the remainder's top bit is set; a NaN shows as the quiet NaN of its sign.
__host__ __device__ __forceinline__ unsigned short remainder_bfloat16_bits(float x) {
    const unsigned u = float_bits(x);
    const int nan = bfloat16_nan_bits(u);
    return static_cast<unsigned short>(nan >= 0 ? static_cast<unsigned>(nan) : (u >> 16) + ((u >> 15) & 1u));
}

//! The int16 remainder of fp32 master x (bits X): its low half, int16(X & 0xFFFF).
__host__ __device__ __forceinline__ short remainder_of(float x) {
    return static_cast<short>(static_cast<unsigned short>(float_bits(x) & 0xFFFFu));
}

//! Wellons' lowbias32 hash (mod 2^32): x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
//! x *= 0x846CA68B; x ^= x >> 16.
__host__ __device__ __forceinline__ unsigned lowbias32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

//! The 16 random bits of the element at global index i under the step's key (key_lo, key_hi: the
//! scalar table's int32 bit patterns): lowbias32(lowbias32(uint32(i) ^ key_lo) ^ uint32(i >> 32)
//! ^ key_hi) >> 16.
__host__ __device__ __forceinline__ unsigned stochastic_round_bits(long long i, int key_lo, int key_hi) {
    const unsigned long long index = static_cast<unsigned long long>(i);
    const unsigned mixed = lowbias32(static_cast<unsigned>(index) ^ static_cast<unsigned>(key_lo));
    return lowbias32(mixed ^ static_cast<unsigned>(index >> 32) ^ static_cast<unsigned>(key_hi)) >> 16;
}

//! fp32 y (bits Y) rounded stochastically to bfloat16 bits with 16 random bits u: (Y + u) >> 16
//! (the magnitude up with probability (Y & 0xFFFF) / 2^16); a NaN becomes the quiet NaN of its sign.
__host__ __device__ __forceinline__ unsigned short stochastic_bfloat16_bits(float y, unsigned u) {
    const unsigned bits = float_bits(y);
    const int nan = bfloat16_nan_bits(bits);
    return static_cast<unsigned short>(nan >= 0 ? static_cast<unsigned>(nan) : (bits + u) >> 16);
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

// --- How the params keep their values: the kernels' template parameter K ------------------------
// Each keeper loads the parameter in math type M and stores the new value: from/into the params
// alone (RoundNearest, RoundStochastic) or with a side buffer of K::Side beside them (FloatMaster,
// Remainders): K::kSide. K::kReadsParams: the load reads the params. K::kIndexed: the store needs
// the element's global index and the step's key.

//! The side buffer of a keeper that has none (never read or written).
struct NoSide {};

//! A keeper's traits: its side buffer's element type S (NoSide: none, kSide false), whether its
//! load reads the params (kReadsParams) and whether its store takes the global index (kIndexed).
template <typename S, bool kHasSide, bool kLoadsParams, bool kTakesIndex>
struct Keeping {
    using Side = S;
    static constexpr bool kSide = kHasSide;
    static constexpr bool kReadsParams = kLoadsParams;
    static constexpr bool kIndexed = kTakesIndex;
};

//! The params alone, rounded to nearest even: p = round(x).
struct RoundNearest : Keeping<NoSide, false, true, false> {
    template <typename M, typename P>
    __host__ __device__ __forceinline__ static M load(const P& p, const Side&) { return load_as<M>(p); }
    template <typename P, typename M>
    __host__ __device__ __forceinline__ static void store(P& p, Side&, M x, long long, const ElementScalars<M>&) {
        p = store_as<P>(x);
    }
};

//! An fp32 master w beside 16-bit params: load w; store w = x, then p = round(x).
struct FloatMaster : Keeping<float, true, false, false> {
    template <typename M, typename P>
    __host__ __device__ __forceinline__ static M load(const P&, const Side& w) { return w; }
    template <typename P, typename M>
    __host__ __device__ __forceinline__ static void store(P& p, Side& w, M x, long long, const ElementScalars<M>&) {
        w = x;
        p = store_as<P>(x);
    }
};

//! int16 remainders r beside bfloat16 params b, together the fp32 master: load join(b, r); store
//! (b, r) = split(x) (join_remainder, remainder_bfloat16_bits, remainder_of).
struct Remainders : Keeping<short, true, true, false> {
    template <typename M>
    __host__ __device__ __forceinline__ static M load(const bfloat16_t& b, const Side& r) {
        return join_remainder(b.bits, r);
    }
    __host__ __device__ __forceinline__ static void store(bfloat16_t& b, Side& r, float x, long long,
                                                          const ElementScalars<float>&) {
        b.bits = remainder_bfloat16_bits(x);
        r = remainder_of(x);
    }
};

//! bfloat16 params alone, rounded stochastically: b = (X + u) >> 16 with u the random bits of the
//! element's global index i under the step's key (stochastic_round_bits).
struct RoundStochastic : Keeping<NoSide, false, true, true> {
    template <typename M>
    __host__ __device__ __forceinline__ static M load(const bfloat16_t& b, const Side&) { return load_as<M>(b); }
    __host__ __device__ __forceinline__ static void store(bfloat16_t& b, Side&, float x, long long i,
                                                          const ElementScalars<float>& s) {
        b.bits = stochastic_bfloat16_bits(x, stochastic_round_bits(i, s.round_key_lo, s.round_key_hi));
    }
};

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

// --- Gradient clipping by the global norm (fastradam/clipping.py states the rules) ---------------

//! The norm of the unscaled gradients from the pre-pass's total (sum |g|^p, or max |g| for
//! kNormInf) of the scaled ones, as fastradam.clipping.finish_norm computes it: the total's p-th
//! root (sqrt for kNormTwo, the total itself for kNormOne, pow(total, 1/p) else; none for
//! kNormInf), times inv_grad_scale.
__host__ __device__ __forceinline__ double norm_of_total(double total, int code, double power,
                                                         double inv_grad_scale) {
    if (code == kNormInf) return total * inv_grad_scale;
    const double root = code == kNormTwo ? sqrt(total) : code == kNormOne ? total : pow(total, 1.0 / power);
    return root * inv_grad_scale;
}

//! torch's clip coefficient min(1, max_norm / (norm + 1e-6)), NaN for a NaN norm (torch.clamp keeps
//! NaN), 0 for an infinite one (fastradam.clipping.clip_coefficient).
__host__ __device__ __forceinline__ double clip_coefficient(double norm, double max_norm) {
    const double coefficient = max_norm / (norm + kNormEps);
    return coefficient >= 1.0 ? 1.0 : coefficient;
}

//! Two partial norms combined: their sum, or for kNormInf their max with NaN kept (a NaN on either
//! side is the result).
__host__ __device__ __forceinline__ double combine_norms(int code, double a, double b) {
    if (code != kNormInf) return a + b;
    return b > a || b != b ? b : a;
}

//! The scalars of step `step` (1-based) for one group, in float64: fastradam.scalars.step_scalars
//! on the device, operation for operation.
//!
//! bc1 = 1 - beta1^t, bc2 = 1 - beta2^t, rho_inf = 2/(1-beta2) - 1,
//! rho_t = rho_inf - 2 t beta2^t / bc2; RECTIFIED when the flavour rectifies rho_t (rho_t >
//! threshold, >= when inclusive), then step_size = lr r_t sqrt(bc2) / bc1 with
//! r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t)); else MOMENTUM with
//! lr / bc1, or HOLD with 0 (and no decoupled decay). eps is scaled by sqrt(bc2) when the flavour
//! adds it to sqrt(v_hat), eps_root by bc2; no stochastic-rounding key (zero). The step must be
//! >= 1; it is not checked (the capturable kernels cannot raise).
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
                                  mode,
                                  0,   // round_key_lo, round_key_hi: stochastic rounding's key is
                                  0};  // folded on the host (no capturable kernels for it)
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
