// RAdam step kernels over flat buffers, one template source for every dtype; instantiated by
// fastradam/backends/cuda.py with RawModule(name_expressions=...).
//
// Memory-bound design: a grid-stride loop moves 16-byte packs (4 floats / 2 doubles) when the
// four pointers share one offset modulo 16 bytes (a scalar head reaches the boundary, a scalar
// tail finishes odd sizes); otherwise every element takes the scalar path. The grid is sized
// from the SM count by the host. Compiled with --fmad=false (see the backend's notes).
#include "radam.cuh"

// Instrumentation hooks for the CPU harness (kernels/host_shim.h counts vector and scalar
// element updates); empty on the GPU.
#ifndef FASTRADAM_COUNT_VECTOR
#define FASTRADAM_COUNT_VECTOR(elements)
#endif
#ifndef FASTRADAM_COUNT_SCALAR
#define FASTRADAM_COUNT_SCALAR()
#endif

namespace fastradam {

//! 16 bytes of storage type T: one vector load or store.
template <typename T>
struct alignas(16) Pack {
    T lane[16 / sizeof(T)];
};

__host__ __device__ __forceinline__ unsigned offset16(const void* ptr) {
    return static_cast<unsigned>(reinterpret_cast<unsigned long long>(ptr) % 16u);
}

template <typename T, typename M>
__device__ __forceinline__ void update_scalar(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                              T* __restrict__ v, long long i, const ElementScalars<M>& s) {
    M pi = load_as<M>(p[i]), mi = load_as<M>(m[i]), vi = load_as<M>(v[i]);
    radam_element(pi, load_as<M>(g[i]), mi, vi, s);
    p[i] = store_as<T>(pi);
    m[i] = store_as<T>(mi);
    v[i] = store_as<T>(vi);
    FASTRADAM_COUNT_SCALAR();
}

template <typename T, typename M>
__device__ __forceinline__ void update_pack(Pack<T>* __restrict__ p, const Pack<T>* __restrict__ g,
                                            Pack<T>* __restrict__ m, Pack<T>* __restrict__ v, long long k,
                                            const ElementScalars<M>& s) {
    Pack<T> pk = p[k], mk = m[k], vk = v[k];
    const Pack<T> gk = g[k];
    for (int j = 0; j < static_cast<int>(16 / sizeof(T)); ++j) {
        M pj = load_as<M>(pk.lane[j]), mj = load_as<M>(mk.lane[j]), vj = load_as<M>(vk.lane[j]);
        radam_element(pj, load_as<M>(gk.lane[j]), mj, vj, s);
        pk.lane[j] = store_as<T>(pj);
        mk.lane[j] = store_as<T>(mj);
        vk.lane[j] = store_as<T>(vj);
    }
    p[k] = pk;
    m[k] = mk;
    v[k] = vk;
    FASTRADAM_COUNT_VECTOR(16 / sizeof(T));
}

//! One RAdam step over n elements, grid-stride: vector body when the pointers are co-aligned,
//! scalar head and tail (or everything scalar when they are not).
template <typename T>
__device__ __forceinline__ void radam_apply(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                            T* __restrict__ v, long long n,
                                            const ElementScalars<typename MathType<T>::type>& s) {
    constexpr long long width = 16 / sizeof(T);
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;

    const unsigned offset = offset16(p);
    const bool coaligned = offset % sizeof(T) == 0 && offset16(g) == offset && offset16(m) == offset &&
                           offset16(v) == offset;
    const long long to_boundary = static_cast<long long>((16u - offset) % 16u / sizeof(T));
    const long long head = coaligned ? (to_boundary < n ? to_boundary : n) : n;
    const long long packs = (n - head) / width;
    const long long body_end = head + packs * width;

    Pack<T>* pp = reinterpret_cast<Pack<T>*>(p + head);
    const Pack<T>* gp = reinterpret_cast<const Pack<T>*>(g + head);
    Pack<T>* mp = reinterpret_cast<Pack<T>*>(m + head);
    Pack<T>* vp = reinterpret_cast<Pack<T>*>(v + head);
    for (long long k = first; k < packs; k += stride) update_pack(pp, gp, mp, vp, k, s);

    const long long scalars = head + (n - body_end);
    for (long long k = first; k < scalars; k += stride) {
        update_scalar(p, g, m, v, k < head ? k : body_end + (k - head), s);
    }
}

//! One RAdam step with host-computed scalars (already rounded to the math type).
template <typename T>
__global__ void radam_step(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                           long long n, typename MathType<T>::type one_minus_beta1,
                           typename MathType<T>::type beta2, typename MathType<T>::type one_minus_beta2,
                           typename MathType<T>::type eps, typename MathType<T>::type l2_weight_decay,
                           typename MathType<T>::type param_decay, typename MathType<T>::type step_size,
                           int negate_grad, int rectified) {
    const ElementScalars<typename MathType<T>::type> s{one_minus_beta1, beta2,     one_minus_beta2,
                                                       eps,             l2_weight_decay, param_decay,
                                                       step_size,       negate_grad,     rectified};
    radam_apply(p, g, m, v, n, s);
}

__host__ __device__ __forceinline__ double read_scalar(double x) { return x; }

template <typename X>
__host__ __device__ __forceinline__ double read_scalar(const X* x) {
    return static_cast<double>(*x);
}

//! Capturable RAdam step: the step count (StepT: int, long long, float or double) is read from
//! device memory and the learning rate either passed by value (LrT = double) or read from device
//! memory (LrT = const float* / const double*); every thread folds the float64 scalars itself, so
//! a CUDA graph replay follows the values on the device.
template <typename T, typename StepT, typename LrT>
__global__ void radam_step_capturable(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                      T* __restrict__ v, long long n, const StepT* step, LrT lr, double beta1,
                                      double beta2, double eps, double weight_decay, int decoupled,
                                      int maximize) {
    const ElementScalars<double> s = radam_step_scalars(read_scalar(step), read_scalar(lr), beta1, beta2, eps,
                                                        weight_decay, decoupled != 0, maximize != 0);
    radam_apply(p, g, m, v, n, cast_scalars<typename MathType<T>::type>(s));
}

}  // namespace fastradam
