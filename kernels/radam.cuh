// RAdam math shared by the CUDA kernels (radam.cu) and the CPU test harness: the per-element
// update and the per-step scalars, all __host__ __device__ and free of CUDA-only constructs.
//
// The formulas mirror fastradam/scalars.py operation for operation, so that, compiled without
// FMA contraction (nvcc/NVRTC --fmad=false, g++ -ffp-contract=off), the GPU, the host harness
// and the Numba backend round identically.
#pragma once

namespace fastradam {

//! The arithmetic type of a storage type: float and double compute in themselves; a later
//! half/bfloat16 storage specialises this to float.
template <typename T>
struct MathType {
    using type = T;
};

//! Converts a stored value to its math type (a specialisation point for half/bfloat16).
template <typename M, typename T>
__host__ __device__ __forceinline__ M load_as(T x) { return static_cast<M>(x); }

//! Converts a math value back to its storage type (a specialisation point for half/bfloat16).
template <typename T, typename M>
__host__ __device__ __forceinline__ T store_as(M x) { return static_cast<T>(x); }

//! The element update of a step (fastradam.scalars MOMENTUM, RECTIFIED, HOLD).
constexpr int kMomentum = 0;   // below the threshold: p = p * param_decay - step_size * m
constexpr int kRectified = 1;  // above it: p = p * param_decay - step_size * m / (sqrt(v) + eps)
constexpr int kHold = 2;       // below it, in flavours that skip the update: p unchanged

//! The folded per-step scalars of fastradam.scalars.StepScalars, in math type M.
template <typename M>
struct ElementScalars {
    M one_minus_beta1;
    M beta2;
    M one_minus_beta2;
    M eps;              // pre-scaled by sqrt(bc2) in flavours that add eps to sqrt(v_hat)
    M l2_weight_decay;  // 0 when the weight decay is decoupled
    M param_decay;      // 1 - lr*wd when decoupled and p updates, else exactly 1
    M step_size;        // lr*r_t*sqrt(bc2)/bc1 (RECTIFIED), lr/bc1 (MOMENTUM), 0 (HOLD)
    M inv_grad_scale;   // 1 / grad_scale: the gradient's unscale factor
    int negate_grad;
    int mode;           // kMomentum, kRectified or kHold
};

//! Rounds float64 scalars to the math type M (as the host backend casts with np.float32(...)).
template <typename M>
__host__ __device__ __forceinline__ ElementScalars<M> cast_scalars(const ElementScalars<double>& s) {
    return ElementScalars<M>{static_cast<M>(s.one_minus_beta1), static_cast<M>(s.beta2),
                             static_cast<M>(s.one_minus_beta2), static_cast<M>(s.eps),
                             static_cast<M>(s.l2_weight_decay), static_cast<M>(s.param_decay),
                             static_cast<M>(s.step_size),      static_cast<M>(s.inv_grad_scale),
                             s.negate_grad,                    s.mode};
}

//! The choices of a fastradam.flavours.Flavour that the device scalars need.
struct FlavourRule {
    double threshold;   // rectify when rho_t > threshold (>= when inclusive)
    bool inclusive;
    bool hold_below;    // below_threshold == "none": HOLD instead of MOMENTUM
    bool eps_on_v_hat;  // eps added to sqrt(v_hat): scaled by sqrt(bc2) here

    __host__ __device__ bool rectifies(double rho_t) const {
        return inclusive ? rho_t >= threshold : rho_t > threshold;
    }
};

//! The scalars of step `step` (1-based), in float64: fastradam.scalars.step_scalars on the device,
//! operation for operation.
//!
//! bc1 = 1 - beta1^t, bc2 = 1 - beta2^t, rho_inf = 2/(1-beta2) - 1,
//! rho_t = rho_inf - 2 t beta2^t / bc2; RECTIFIED when the flavour rectifies rho_t, then
//! step_size = lr r_t sqrt(bc2) / bc1 with
//! r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t)); else MOMENTUM with
//! lr / bc1, or HOLD with 0 (and no decoupled decay). The step must be >= 1; it is not checked
//! (the capturable kernel cannot raise).
__host__ __device__ inline ElementScalars<double> radam_step_scalars(double step, double lr, double beta1,
                                                                     double beta2, double eps,
                                                                     double weight_decay, bool decoupled,
                                                                     bool maximize, const FlavourRule& flavour) {
    const double bias_correction1 = 1.0 - pow(beta1, step);
    const double bias_correction2 = 1.0 - pow(beta2, step);
    const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    const double beta2_t = pow(beta2, step);
    const double rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t);
    int mode;
    double step_size;
    if (flavour.rectifies(rho_t)) {
        mode = kRectified;
        const double rect =
            sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
        step_size = lr * rect * sqrt(bias_correction2) / bias_correction1;
    } else {
        mode = flavour.hold_below ? kHold : kMomentum;
        step_size = mode == kMomentum ? lr / bias_correction1 : 0.0;
    }
    const bool decays = decoupled && mode != kHold;
    return ElementScalars<double>{1.0 - beta1,
                                  beta2,
                                  1.0 - beta2,
                                  flavour.eps_on_v_hat ? eps * sqrt(bias_correction2) : eps,
                                  decoupled ? 0.0 : weight_decay,
                                  decays ? 1.0 - lr * weight_decay : 1.0,
                                  step_size,
                                  1.0,
                                  maximize ? 1 : 0,
                                  mode};
}

//! One element of the RAdam update, in place on (p, m, v), in math type M, in exactly the
//! operation order of the Numba backend's _radam_element:
//!
//!     g = g * inv_grad_scale;  g = -g if negate_grad;  g = g + l2_weight_decay * p (when nonzero)
//!     m = m + (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g g
//!     p = p * param_decay - step_size m / (sqrt(v) + eps)   RECTIFIED
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
        p = p * s.param_decay - s.step_size * m / (sqrt(v) + s.eps);
    } else if (s.mode != kHold) {
        p = p * s.param_decay - s.step_size * m;
    }
}

}  // namespace fastradam
