// C entry points of the CPU harness around kernels/radam.cu (built by tests/cuda_harness.py).
// Each storage combination of the harness (HARNESS_COMBINATIONS in cuda_harness.py) gets its
// launchers, named by a suffix such as bf16_bf16_f32_master; buffers travel as void pointers.
#include "host_shim.h"
#include "radam.cu"

using fastradam::bfloat16_t;
using fastradam::ElementScalars;
using fastradam::FlavourRule;
using fastradam::float16_t;

extern "C" {

void reset_counts() { element_counts = ElementCounts{}; }

void read_counts(long long* out) {
    out[0] = element_counts.vector;
    out[1] = element_counts.scalar;
}

//! fastradam::radam_step_scalars: out = the 8 float64 scalars, flags = (negate_grad, mode).
void step_scalars(double step, double lr, double beta1, double beta2, double eps, double weight_decay,
                  int decoupled, int maximize, double threshold, int inclusive, int hold_below, int eps_on_v_hat,
                  double* out, int* flags) {
    const FlavourRule flavour{threshold, inclusive != 0, hold_below != 0, eps_on_v_hat != 0};
    const ElementScalars<double> s = fastradam::radam_step_scalars(step, lr, beta1, beta2, eps, weight_decay,
                                                                   decoupled != 0, maximize != 0, flavour);
    const double values[8] = {s.one_minus_beta1, s.beta2,       s.one_minus_beta2, s.eps,
                              s.l2_weight_decay, s.param_decay, s.step_size,       s.inv_grad_scale};
    for (int i = 0; i < 8; ++i) out[i] = values[i];
    flags[0] = s.negate_grad;
    flags[1] = s.mode;
}

//! The storage conversions of radam.cuh over arrays (what the harness kernels use).
void bfloat16_to_float(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = fastradam::bfloat16_bits_to_float(in[i]);
}
void float_to_bfloat16(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = fastradam::float_to_bfloat16_bits(in[i]);
}
void float16_to_float(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = fastradam::float16_bits_to_float(in[i]);
}
void float_to_float16(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = fastradam::float_to_float16_bits(in[i]);
}

#define FASTRADAM_COMBO(SUFFIX, P, G, MO, MASTER)                                                              \
    void radam_step_##SUFFIX(unsigned grid, unsigned block, void* p, const void* g, void* m, void* v,         \
                             float* master, long long n, const void* row, const int* flags, const void* skip, \
                             int skip_code) {                                                                 \
        using M = fastradam::MathOf<P, G, MO, MASTER>;                                                        \
        const M* f = static_cast<const M*>(row);                                                              \
        launch(grid, block, fastradam::radam_step<P, G, MO, MASTER>, static_cast<P*>(p),                      \
               static_cast<const G*>(g), static_cast<MO*>(m), static_cast<MO*>(v), master, n, f[0], f[1], f[2], \
               f[3], f[4], f[5], f[6], f[7], flags[0], flags[1], skip, skip_code);                            \
    }                                                                                                          \
    void radam_step_segments_##SUFFIX(unsigned grid, unsigned block, void* p, const void* g, void* m, void* v, \
                                      float* master, const long long* tiles, long long n_tiles,               \
                                      const int* segment_row, const void* floats, const int* ints,            \
                                      const void* skip, int skip_code) {                                      \
        using M = fastradam::MathOf<P, G, MO, MASTER>;                                                        \
        launch(grid, block, fastradam::radam_step_segments<P, G, MO, MASTER>, static_cast<P*>(p),             \
               static_cast<const G*>(g), static_cast<MO*>(m), static_cast<MO*>(v), master, tiles, n_tiles,    \
               segment_row, static_cast<const M*>(floats), ints, skip, skip_code);                            \
    }                                                                                                          \
    void radam_step_tensors_##SUFFIX(unsigned grid, unsigned block, void* const* pointers,                    \
                                     const long long* tiles, long long n_tiles, const int* tensor_row,        \
                                     const void* floats, const int* ints, const void* skip, int skip_code) {  \
        using M = fastradam::MathOf<P, G, MO, MASTER>;                                                        \
        launch(grid, block, fastradam::radam_step_tensors<P, G, MO, MASTER>, pointers, tiles, n_tiles,        \
               tensor_row, static_cast<const M*>(floats), ints, skip, skip_code);                             \
    }                                                                                                          \
    void radam_step_segments_capturable_##SUFFIX(                                                             \
        unsigned grid, unsigned block, void* p, const void* g, void* m, void* v, float* master,                \
        const long long* tiles, long long n_tiles, const int* segment_group, const void* steps, int step_code, \
        const double* group_floats, const int* group_ints, const unsigned long long* lr_pointers,             \
        const void* skip, int skip_code) {                                                                     \
        launch(grid, block, fastradam::radam_step_segments_capturable<P, G, MO, MASTER>, static_cast<P*>(p),  \
               static_cast<const G*>(g), static_cast<MO*>(m), static_cast<MO*>(v), master, tiles, n_tiles,    \
               segment_group, steps, step_code, group_floats, group_ints, lr_pointers, skip, skip_code);      \
    }                                                                                                          \
    void radam_step_capturable_##SUFFIX(                                                                      \
        unsigned grid, unsigned block, void* p, const void* g, void* m, void* v, float* master, long long n,   \
        const void* step, int step_code, const void* lr, int lr_code, double lr_value, double beta1,           \
        double beta2, double eps, double weight_decay, int decoupled, int maximize, double threshold,         \
        int inclusive, int hold_below, int eps_on_v_hat, double inv_grad_scale, const void* skip,             \
        int skip_code) {                                                                                       \
        launch(grid, block, fastradam::radam_step_capturable<P, G, MO, MASTER>, static_cast<P*>(p),           \
               static_cast<const G*>(g), static_cast<MO*>(m), static_cast<MO*>(v), master, n, step, step_code, \
               lr, lr_code, lr_value, beta1, beta2, eps, weight_decay, decoupled, maximize, threshold,        \
               inclusive, hold_below, eps_on_v_hat, inv_grad_scale, skip, skip_code);                         \
    }

// tests/test_mixed_precision.py::COMBINATIONS, then all-float64.
FASTRADAM_COMBO(f32_f32_f32, float, float, float, false)
FASTRADAM_COMBO(bf16_bf16_f32, bfloat16_t, bfloat16_t, float, false)
FASTRADAM_COMBO(bf16_bf16_bf16, bfloat16_t, bfloat16_t, bfloat16_t, false)
FASTRADAM_COMBO(bf16_bf16_f32_master, bfloat16_t, bfloat16_t, float, true)
FASTRADAM_COMBO(f16_f16_f32, float16_t, float16_t, float, false)
FASTRADAM_COMBO(f16_f16_f32_master, float16_t, float16_t, float, true)
FASTRADAM_COMBO(f16_bf16_bf16_master, float16_t, bfloat16_t, bfloat16_t, true)
FASTRADAM_COMBO(f32_bf16_bf16, float, bfloat16_t, bfloat16_t, false)
FASTRADAM_COMBO(bf16_f32_f32, bfloat16_t, float, float, false)
FASTRADAM_COMBO(f64_f64_f64, double, double, double, false)

#define FASTRADAM_FINITE(SUFFIX, G)                                                                            \
    void nonfinite_flat_##SUFFIX(unsigned grid, unsigned block, const void* g, long long n,                   \
                                 const void* found_inf, int code, int* flag) {                                \
        launch(grid, block, fastradam::nonfinite_flat<G>, static_cast<const G*>(g), n, found_inf, code, flag); \
    }                                                                                                          \
    void nonfinite_segments_##SUFFIX(unsigned grid, unsigned block, const void* g, const long long* tiles,    \
                                     long long n_tiles, const int* rows, const void* found_inf, int code,     \
                                     int* flag) {                                                             \
        launch(grid, block, fastradam::nonfinite_segments<G>, static_cast<const G*>(g), tiles, n_tiles, rows,  \
               found_inf, code, flag);                                                                         \
    }                                                                                                          \
    void nonfinite_tensors_##SUFFIX(unsigned grid, unsigned block, void* const* pointers, long long columns,  \
                                    const long long* tiles, long long n_tiles, const int* rows,               \
                                    const void* found_inf, int code, int* flag) {                             \
        launch(grid, block, fastradam::nonfinite_tensors<G>, pointers, columns, tiles, n_tiles, rows,         \
               found_inf, code, flag);                                                                         \
    }
FASTRADAM_FINITE(f32, float)
FASTRADAM_FINITE(f64, double)
FASTRADAM_FINITE(bf16, bfloat16_t)
FASTRADAM_FINITE(f16, float16_t)

}  // extern "C"
