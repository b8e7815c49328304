// RAdam step kernels, one template source for every dtype; instantiated by
// fastradam/backends/cuda.py with RawModule(name_expressions=...).
//
// Memory-bound design: threads move 16-byte packs (4 floats / 2 doubles) when the four pointers
// share one offset modulo 16 bytes (a scalar head reaches the boundary, a scalar tail finishes
// odd sizes); otherwise every element takes the scalar path. One routine (radam_apply) does this
// over a range for every kernel:
//   - radam_step / radam_step_capturable: one flat range, grid-stride over the whole grid;
//   - radam_step_segments / radam_step_tensors: a tile table (start, stop, index) of ranges of a
//     few thousand elements inside the segments of flat buffers, or inside separate tensors
//     reached through a pointer table; each block takes tiles in turn (grid-stride over tiles),
//     reads the tile's row of scalars once, and its threads stride over the tile.
// The grid is sized from the SM count by the host. Compiled with --fmad=false (see the backend).
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

//! One RAdam step over the n elements at p, g, m, v, by threads `first`, `first + stride`, ...:
//! vector body when the pointers are co-aligned, scalar head and tail (or everything scalar
//! when they are not).
template <typename T>
__device__ __forceinline__ void radam_apply(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                            T* __restrict__ v, long long n,
                                            const ElementScalars<typename MathType<T>::type>& s,
                                            long long first, long long stride) {
    constexpr long long width = 16 / sizeof(T);
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

__device__ __forceinline__ long long grid_thread() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_threads() { return static_cast<long long>(gridDim.x) * blockDim.x; }

//! One RAdam step with host-computed scalars (already rounded to the math type).
template <typename T>
__global__ void radam_step(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                           long long n, typename MathType<T>::type one_minus_beta1,
                           typename MathType<T>::type beta2, typename MathType<T>::type one_minus_beta2,
                           typename MathType<T>::type eps, typename MathType<T>::type l2_weight_decay,
                           typename MathType<T>::type param_decay, typename MathType<T>::type step_size,
                           typename MathType<T>::type inv_grad_scale, int negate_grad, int mode) {
    const ElementScalars<typename MathType<T>::type> s{one_minus_beta1, beta2,       one_minus_beta2,
                                                       eps,             l2_weight_decay, param_decay,
                                                       step_size,       inv_grad_scale,  negate_grad,
                                                       mode};
    radam_apply(p, g, m, v, n, s, grid_thread(), grid_threads());
}

//! Columns of a tile row: the range [start, stop) of the tile inside its segment's flat
//! buffers (or inside its tensor), and the segment's (tensor's) index.
constexpr int kTileFields = 3;

//! Row `row` of the host tables: floats (R, 8) in the buffer dtype, columns as
//! fastradam.scalars.FLOAT_FIELDS, and ints (R, 2), columns as INT_FIELDS.
template <typename T>
__device__ __forceinline__ ElementScalars<typename MathType<T>::type> load_row(const T* __restrict__ floats,
                                                                               const int* __restrict__ ints,
                                                                               int row) {
    using M = typename MathType<T>::type;
    constexpr int kFloatFields = 8;
    constexpr int kIntFields = 2;
    const T* f = floats + static_cast<long long>(row) * kFloatFields;
    const int* i = ints + static_cast<long long>(row) * kIntFields;
    return ElementScalars<M>{load_as<M>(f[0]), load_as<M>(f[1]), load_as<M>(f[2]), load_as<M>(f[3]),
                             load_as<M>(f[4]), load_as<M>(f[5]), load_as<M>(f[6]), load_as<M>(f[7]),
                             i[0],             i[1]};
}

//! One tile's work: its range and the row of scalars it uses. Every thread of a block reads
//! the same entries, once per tile (uniform loads, broadcast by the cache), and keeps the row
//! in registers: the element loop reads no table.
struct Tile {
    long long start;
    long long stop;
    int index;  // segment or tensor
    int row;    // < 0: skipped
};

__device__ __forceinline__ Tile load_tile(const long long* __restrict__ tiles, const int* __restrict__ index_row,
                                          long long tile) {
    const long long* t = tiles + tile * kTileFields;
    const int index = static_cast<int>(t[2]);
    return Tile{t[0], t[1], index, index_row[index]};
}

//! One RAdam step over the segments of flat buffers, in one launch. Tile `t` covers elements
//! [start, stop) of segment `index`, which uses row segment_row[index] of floats/ints (< 0: the
//! segment is neither read nor written). Padding between segments is in no tile.
template <typename T>
__global__ void radam_step_segments(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                    T* __restrict__ v, const long long* __restrict__ tiles, long long n_tiles,
                                    const int* __restrict__ segment_row, const T* __restrict__ floats,
                                    const int* __restrict__ ints) {
    for (long long tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const Tile t = load_tile(tiles, segment_row, tile);
        if (t.row < 0) continue;
        radam_apply(p + t.start, g + t.start, m + t.start, v + t.start, t.stop - t.start,
                    load_row(floats, ints, t.row), threadIdx.x, blockDim.x);
    }
}

//! `ptr`, declared to point into global memory: the compiler cannot infer that of a pointer
//! loaded from a table (only of kernel arguments), and would emit generic loads and stores.
template <typename T>
__device__ __forceinline__ T* in_global(T* ptr) {
#if defined(__CUDA_ARCH__)
    __builtin_assume(__isGlobal(ptr));
#endif
    return ptr;
}

//! One RAdam step over separate tensors, in one launch: tensor `i` is the four buffers at
//! pointers[4 i .. 4 i + 3] (params, grads, exp_avg, exp_avg_sq); tile `t` covers elements
//! [start, stop) of tensor `index`, which uses row tensor_row[index] (< 0: skipped).
template <typename T>
__global__ void radam_step_tensors(T* const* __restrict__ pointers, const long long* __restrict__ tiles,
                                   long long n_tiles, const int* __restrict__ tensor_row,
                                   const T* __restrict__ floats, const int* __restrict__ ints) {
    for (long long tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const Tile t = load_tile(tiles, tensor_row, tile);
        if (t.row < 0) continue;
        T* const* q = pointers + 4LL * t.index;
        radam_apply(in_global(q[0]) + t.start, static_cast<const T*>(in_global(q[1])) + t.start,
                    in_global(q[2]) + t.start, in_global(q[3]) + t.start, t.stop - t.start,
                    load_row(floats, ints, t.row), threadIdx.x, blockDim.x);
    }
}

__host__ __device__ __forceinline__ double read_scalar(double x) { return x; }

template <typename X>
__host__ __device__ __forceinline__ double read_scalar(const X* x) {
    return static_cast<double>(*x);
}

//! Capturable RAdam step: the step count (StepT: int, long long, float or double) is read from
//! device memory and the learning rate either passed by value (LrT = double) or read from device
//! memory (LrT = const float* / const double*); every thread folds the float64 scalars itself
//! (with the flavour's threshold, inclusive, hold_below and eps_on_v_hat), so a CUDA graph
//! replay follows the values on the device.
template <typename T, typename StepT, typename LrT>
__global__ void radam_step_capturable(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                      T* __restrict__ v, long long n, const StepT* step, LrT lr, double beta1,
                                      double beta2, double eps, double weight_decay, int decoupled,
                                      int maximize, double threshold, int inclusive, int hold_below,
                                      int eps_on_v_hat) {
    const FlavourRule flavour{threshold, inclusive != 0, hold_below != 0, eps_on_v_hat != 0};
    const ElementScalars<double> s = radam_step_scalars(read_scalar(step), read_scalar(lr), beta1, beta2, eps,
                                                        weight_decay, decoupled != 0, maximize != 0, flavour);
    radam_apply(p, g, m, v, n, cast_scalars<typename MathType<T>::type>(s), grid_thread(), grid_threads());
}

}  // namespace fastradam
