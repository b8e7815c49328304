// C entry points of the CPU harness around kernels/radam.cu (built by tests/cuda_harness.py).
#include "host_shim.h"
#include "radam.cu"

using fastradam::ElementScalars;

extern "C" {

void reset_counts() { element_counts = ElementCounts{}; }

void read_counts(long long* out) {
    out[0] = element_counts.vector;
    out[1] = element_counts.scalar;
}

//! fastradam::radam_step_scalars: out = the 7 float64 scalars, flags = (negate_grad, rectified).
void step_scalars(double step, double lr, double beta1, double beta2, double eps, double weight_decay,
                  int decoupled, int maximize, double* out, int* flags) {
    const ElementScalars<double> s =
        fastradam::radam_step_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled != 0, maximize != 0);
    const double values[7] = {s.one_minus_beta1, s.beta2,       s.one_minus_beta2, s.eps,
                              s.l2_weight_decay, s.param_decay, s.step_size};
    for (int i = 0; i < 7; ++i) out[i] = values[i];
    flags[0] = s.negate_grad;
    flags[1] = s.rectified;
}

#define FASTRADAM_STEP(SUFFIX, T)                                                                              \
    void radam_step_##SUFFIX(unsigned grid, unsigned block, T* p, const T* g, T* m, T* v, long long n,        \
                             T one_minus_beta1, T beta2, T one_minus_beta2, T eps, T l2_weight_decay,         \
                             T param_decay, T step_size, int negate_grad, int rectified) {                    \
        launch(grid, block, fastradam::radam_step<T>, p, g, m, v, n, one_minus_beta1, beta2, one_minus_beta2, \
               eps, l2_weight_decay, param_decay, step_size, negate_grad, rectified);                        \
    }
FASTRADAM_STEP(float32, float)
FASTRADAM_STEP(float64, double)

#define FASTRADAM_CAPTURABLE(SUFFIX, T, STEP, LR)                                                             \
    void radam_step_capturable_##SUFFIX(unsigned grid, unsigned block, T* p, const T* g, T* m, T* v,        \
                                        long long n, const STEP* step, LR lr, double beta1, double beta2,    \
                                        double eps, double weight_decay, int decoupled, int maximize) {      \
        launch(grid, block, fastradam::radam_step_capturable<T, STEP, LR>, p, g, m, v, n, step, lr, beta1,   \
               beta2, eps, weight_decay, decoupled, maximize);                                               \
    }
#define FASTRADAM_CAPTURABLE_LR(SUFFIX, T, STEP)                                                            \
    FASTRADAM_CAPTURABLE(SUFFIX##_host, T, STEP, double)                                                     \
    FASTRADAM_CAPTURABLE(SUFFIX##_float32, T, STEP, const float*)                                            \
    FASTRADAM_CAPTURABLE(SUFFIX##_float64, T, STEP, const double*)
#define FASTRADAM_CAPTURABLE_STEP(SUFFIX, T)                                                                \
    FASTRADAM_CAPTURABLE_LR(SUFFIX##_int32, T, int)                                                          \
    FASTRADAM_CAPTURABLE_LR(SUFFIX##_int64, T, long long)                                                    \
    FASTRADAM_CAPTURABLE_LR(SUFFIX##_float32, T, float)                                                      \
    FASTRADAM_CAPTURABLE_LR(SUFFIX##_float64, T, double)
FASTRADAM_CAPTURABLE_STEP(float32, float)
FASTRADAM_CAPTURABLE_STEP(float64, double)

}  // extern "C"
