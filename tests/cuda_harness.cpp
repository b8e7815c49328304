// C entry points of the CPU harness around kernels/radam.cu (built by tests/cuda_harness.py).
// Every storage combination gets its launchers, named by a suffix such as bf16_bf16_f32_master.
#include "host_shim.h"
#include "radam.cu"

#include <cstddef>
#include <type_traits>
#include <utility>

using fastradam::ElementScalars;

//! Runs `kernel` with parameter i read from args[i] as the kernel's declared type (by value), the
//! way cuLaunchKernel reads kernelParams.
template <typename... Params, std::size_t... I>
void launch_packed(unsigned grid, unsigned block, void (*kernel)(Params...), void* const* args,
                   std::index_sequence<I...>) {
    launch(grid, block, kernel, *static_cast<std::remove_cv_t<std::remove_reference_t<Params>>*>(args[I])...);
}
template <typename... Params>
void launch_packed(unsigned grid, unsigned block, void (*kernel)(Params...), void* const* args) {
    launch_packed(grid, block, kernel, args, std::index_sequence_for<Params...>{});
}

extern "C" {

void reset_counts() { element_counts = ElementCounts{}; }

void read_counts(long long* out) {
    out[0] = element_counts.vector;
    out[1] = element_counts.scalar;
}

//! fastradam::radam_step_scalars of step `step`, lr `lr` and the group row *group, into *out.
void step_scalars(double step, double lr, const fastradam::GroupRow* group, ElementScalars<double>* out) {
    *out = fastradam::radam_step_scalars(step, lr, *group);
}

//! The layout of the ABI records, to compare with the NumPy records that stand for them:
//! sizeof(ElementScalars<float>), its field offsets, the same for ElementScalars<double>, then GroupRow.
long long abi_layout(long long* out) {
    long long k = 0;
#define FASTRADAM_OFFSET_FLOAT(field) out[k++] = offsetof(ElementScalars<float>, field);
#define FASTRADAM_OFFSET_DOUBLE(field) out[k++] = offsetof(ElementScalars<double>, field);
#define FASTRADAM_OFFSET_GROUP(field) out[k++] = offsetof(fastradam::GroupRow, field);
    out[k++] = sizeof(ElementScalars<float>);
    FASTRADAM_SCALAR_FIELDS(FASTRADAM_OFFSET_FLOAT)
    out[k++] = sizeof(ElementScalars<double>);
    FASTRADAM_SCALAR_FIELDS(FASTRADAM_OFFSET_DOUBLE)
    out[k++] = sizeof(fastradam::GroupRow);
    FASTRADAM_GROUP_FIELDS(FASTRADAM_OFFSET_GROUP)
    return k;
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

//! The param-keeping codecs of radam.cuh over arrays: fp32 masters split into bfloat16 bits and
//! int16 remainders and joined back; fp32 values rounded stochastically at global indices `index`.
void split_remainders(const float* in, unsigned short* bits, short* remainders, long long n) {
    for (long long i = 0; i < n; ++i) {
        bits[i] = fastradam::remainder_bfloat16_bits(in[i]);
        remainders[i] = fastradam::remainder_of(in[i]);
    }
}
void join_remainders(const unsigned short* bits, const short* remainders, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = fastradam::join_remainder(bits[i], remainders[i]);
}
void stochastic_round(const float* in, const long long* index, int key_lo, int key_hi, unsigned short* out,
                      long long n) {
    for (long long i = 0; i < n; ++i) {
        out[i] = fastradam::stochastic_bfloat16_bits(in[i], fastradam::stochastic_round_bits(index[i], key_lo, key_hi));
    }
}

// Every update kernel of every storage combination (generated/abi.cuh's lists: the capturable
// ones for every storage but stochastic rounding) and every gradient pre-pass, as
// launch_<kernel>_<suffix>(grid, block, args): args[i] points at the value of the kernel's parameter i, as cuLaunchKernel's kernelParams do, packed by the CUDA
// backend's own argument builders (fastradam/backends/cuda/launch.py).
#define FASTRADAM_LAUNCHERS(SUFFIX, P, G, MO, K)                                                              \
    void launch_radam_step_##SUFFIX(unsigned grid, unsigned block, void* const* args) {                      \
        launch_packed(grid, block, fastradam::radam_step<P, G, MO, K>, args);                                \
    }                                                                                                          \
    void launch_radam_step_segments_##SUFFIX(unsigned grid, unsigned block, void* const* args) {             \
        launch_packed(grid, block, fastradam::radam_step_segments<P, G, MO, K>, args);                       \
    }                                                                                                          \
    void launch_radam_step_tensors_##SUFFIX(unsigned grid, unsigned block, void* const* args) {              \
        launch_packed(grid, block, fastradam::radam_step_tensors<P, G, MO, K>, args);                        \
    }
FASTRADAM_FOR_EACH_STORAGE(FASTRADAM_LAUNCHERS)

#define FASTRADAM_CAPTURABLE_LAUNCHERS(SUFFIX, P, G, MO, K)                                                   \
    void launch_radam_step_capturable_##SUFFIX(unsigned grid, unsigned block, void* const* args) {           \
        launch_packed(grid, block, fastradam::radam_step_capturable<P, G, MO, K>, args);                     \
    }                                                                                                          \
    void launch_radam_step_segments_capturable_##SUFFIX(unsigned grid, unsigned block, void* const* args) {  \
        launch_packed(grid, block, fastradam::radam_step_segments_capturable<P, G, MO, K>, args);            \
    }
FASTRADAM_FOR_EACH_CAPTURABLE_STORAGE(FASTRADAM_CAPTURABLE_LAUNCHERS)

#define FASTRADAM_PREPASS_LAUNCHERS(SUFFIX, G)                                                                 \
    void launch_prepass_flat_##SUFFIX(unsigned grid, unsigned block, void* const* args) {                    \
        launch_packed(grid, block, fastradam::prepass_flat<G>, args);                                        \
    }                                                                                                          \
    void launch_prepass_segments_##SUFFIX(unsigned grid, unsigned block, void* const* args) {                \
        launch_packed(grid, block, fastradam::prepass_segments<G>, args);                                    \
    }                                                                                                          \
    void launch_prepass_tensors_##SUFFIX(unsigned grid, unsigned block, void* const* args) {                 \
        launch_packed(grid, block, fastradam::prepass_tensors<G>, args);                                     \
    }
FASTRADAM_FOR_EACH_FORMAT(FASTRADAM_PREPASS_LAUNCHERS)

//! The clipping rules of radam.cuh, one value at a time (checked against fastradam.clipping).
double clip_coefficient(double norm, double max_norm) { return fastradam::clip_coefficient(norm, max_norm); }
double norm_of_total(double total, int code, double power, double inv_grad_scale) {
    return fastradam::norm_of_total(total, code, power, inv_grad_scale);
}
double combine_norms(int code, double a, double b) { return fastradam::combine_norms(code, a, b); }

}  // extern "C"
