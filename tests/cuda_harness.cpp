// C entry points of the CPU harness around kernels/radam.cu (built by tests/cuda_harness.py).
#include "host_shim.h"
#include "radam.cu"

using fastradam::ElementScalars;
using fastradam::FlavourRule;

extern "C" {

void reset_counts() { element_counts = ElementCounts{}; }

void read_counts(long long* out) {
    out[0] = element_counts.vector;
    out[1] = element_counts.scalar;
}

//! fastradam::radam_step_scalars: out = the 7 float64 scalars, flags = (negate_grad, mode).
void step_scalars(double step, double lr, double beta1, double beta2, double eps, double weight_decay,
                  int decoupled, int maximize, double threshold, int inclusive, int hold_below, int eps_on_v_hat,
                  double* out, int* flags) {
    const FlavourRule flavour{threshold, inclusive != 0, hold_below != 0, eps_on_v_hat != 0};
    const ElementScalars<double> s = fastradam::radam_step_scalars(step, lr, beta1, beta2, eps, weight_decay,
                                                                   decoupled != 0, maximize != 0, flavour);
    const double values[7] = {s.one_minus_beta1, s.beta2,       s.one_minus_beta2, s.eps,
                              s.l2_weight_decay, s.param_decay, s.step_size};
    for (int i = 0; i < 7; ++i) out[i] = values[i];
    flags[0] = s.negate_grad;
    flags[1] = s.mode;
}

#define FASTRADAM_STEP(SUFFIX, T)                                                                              \
    void radam_step_##SUFFIX(unsigned grid, unsigned block, T* p, const T* g, T* m, T* v, long long n,        \
                             T one_minus_beta1, T beta2, T one_minus_beta2, T eps, T l2_weight_decay,         \
                             T param_decay, T step_size, T inv_grad_scale, int negate_grad, int mode) {       \
        launch(grid, block, fastradam::radam_step<T>, p, g, m, v, n, one_minus_beta1, beta2, one_minus_beta2, \
               eps, l2_weight_decay, param_decay, step_size, inv_grad_scale, negate_grad, mode);             \
    }                                                                                                          \
    void radam_step_segments_##SUFFIX(unsigned grid, unsigned block, T* p, const T* g, T* m, T* v,            \
                                      const long long* tiles, long long n_tiles, const int* segment_row,      \
                                      const T* floats, const int* ints) {                                     \
        launch(grid, block, fastradam::radam_step_segments<T>, p, g, m, v, tiles, n_tiles, segment_row,       \
               floats, ints);                                                                                  \
    }                                                                                                          \
    void radam_step_tensors_##SUFFIX(unsigned grid, unsigned block, T* const* pointers,                      \
                                     const long long* tiles, long long n_tiles, const int* tensor_row,        \
                                     const T* floats, const int* ints) {                                      \
        launch(grid, block, fastradam::radam_step_tensors<T>, pointers, tiles, n_tiles, tensor_row, floats,   \
               ints);                                                                                          \
    }
FASTRADAM_STEP(float32, float)
FASTRADAM_STEP(float64, double)

#define FASTRADAM_CAPTURABLE(SUFFIX, T, STEP, LR)                                                             \
    void radam_step_capturable_##SUFFIX(unsigned grid, unsigned block, T* p, const T* g, T* m, T* v,        \
                                        long long n, const STEP* step, LR lr, double beta1, double beta2,    \
                                        double eps, double weight_decay, int decoupled, int maximize,        \
                                        double threshold, int inclusive, int hold_below, int eps_on_v_hat) { \
        launch(grid, block, fastradam::radam_step_capturable<T, STEP, LR>, p, g, m, v, n, step, lr, beta1,   \
               beta2, eps, weight_decay, decoupled, maximize, threshold, inclusive, hold_below,              \
               eps_on_v_hat);                                                                                \
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
