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

//! torch.optim.RAdam rectifies the adaptive step when rho_t > this.
constexpr double kRectifyThreshold = 5.0;

//! The folded per-step scalars of fastradam.scalars.StepScalars, in math type M.
template <typename M>
struct ElementScalars {
    M one_minus_beta1;
    M beta2;
    M one_minus_beta2;
    M eps;
    M l2_weight_decay;  // 0 when the weight decay is decoupled
    M param_decay;      // 1 - lr*wd when decoupled, else exactly 1
    M step_size;        // lr*r_t*sqrt(bc2)/bc1 when rectified, else lr/bc1
    int negate_grad;
    int rectified;
};

//! Rounds float64 scalars to the math type M (as the host backend casts with np.float32(...)).
template <typename M>
__host__ __device__ __forceinline__ ElementScalars<M> cast_scalars(const ElementScalars<double>& s) {
    return ElementScalars<M>{static_cast<M>(s.one_minus_beta1), static_cast<M>(s.beta2),
                             static_cast<M>(s.one_minus_beta2), static_cast<M>(s.eps),
                             static_cast<M>(s.l2_weight_decay), static_cast<M>(s.param_decay),
                             static_cast<M>(s.step_size),      s.negate_grad,
                             s.rectified};
}

//! The scalars of step `step` (1-based), in float64: fastradam.scalars.step_scalars on the device.
//!
//! bc1 = 1 - beta1^t, bc2 = 1 - beta2^t, rho_inf = 2/(1-beta2) - 1,
//! rho_t = rho_inf - 2 t beta2^t / bc2; rectified iff rho_t > 5, then
//! step_size = lr r_t sqrt(bc2) / bc1 with
//! r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t)), else lr / bc1.
//! The step must be >= 1; it is not checked (the capturable kernel cannot raise).
__host__ __device__ inline ElementScalars<double> radam_step_scalars(double step, double lr, double beta1,
                                                                     double beta2, double eps,
                                                                     double weight_decay, bool decoupled,
                                                                     bool maximize) {
    const double bias_correction1 = 1.0 - pow(beta1, step);
    const double bias_correction2 = 1.0 - pow(beta2, step);
    const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    const double beta2_t = pow(beta2, step);
    const double rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t);
    const bool rectified = rho_t > kRectifyThreshold;
    double step_size;
    if (rectified) {
        const double rect =
            sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
        step_size = lr * rect * sqrt(bias_correction2) / bias_correction1;
    } else {
        step_size = lr / bias_correction1;
    }
    return ElementScalars<double>{1.0 - beta1,
                                  beta2,
                                  1.0 - beta2,
                                  eps,
                                  decoupled ? 0.0 : weight_decay,
                                  decoupled ? 1.0 - lr * weight_decay : 1.0,
                                  step_size,
                                  maximize ? 1 : 0,
                                  rectified ? 1 : 0};
}

//! One element of the RAdam update, in place on (p, m, v), in math type M:
//!
//!     g = -g if negate_grad;  g = g + l2_weight_decay * p (when nonzero);  p = p * param_decay
//!     m = m + (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g g
//!     p = p - step_size m / (sqrt(v) + eps)  if rectified,  else  p = p - step_size m
template <typename M>
__host__ __device__ __forceinline__ void radam_element(M& p, M g, M& m, M& v, const ElementScalars<M>& s) {
    if (s.negate_grad) g = -g;
    if (s.l2_weight_decay != M(0)) g = g + s.l2_weight_decay * p;
    p = p * s.param_decay;
    m = m + s.one_minus_beta1 * (g - m);
    v = s.beta2 * v + s.one_minus_beta2 * g * g;
    if (s.rectified) {
        p = p - s.step_size * m / (sqrt(v) + s.eps);
    } else {
        p = p - s.step_size * m;
    }
}

}  // namespace fastradam
