// RAdam step kernels, one template source for every storage combination; instantiated by
// fastradam/backends/cuda (module.py) with RawModule(name_expressions=...); the ABI records and
// constants come from generated/abi.cuh (fastradam/spec.py).
//
// Storage: every kernel is templated on the storage of each role, P (params), G (grads) and Mo
// (exp_avg and exp_avg_sq), each float, double, bfloat16_t or float16_t (the 16-bit formats as
// bit patterns; see radam.cuh), and on K, how the params keep their values (radam.cuh's keepers):
// RoundNearest (the params alone), FloatMaster (an fp32 master beside 16-bit params: the step
// reads and updates the master and writes its rounded copy into params in the same pass),
// Remainders (int16 remainders beside bfloat16 params, together the fp32 master) or
// RoundStochastic (bfloat16 params rounded stochastically with the element's global index: the
// multi-tensor kernels take each segment's or tensor's index shift; no capturable kernels).
// The math type is MathType<P, G, Mo>: float, or double when everything is double. On the GPU
// the 16-bit conversions are the CUDA intrinsics of cuda_bf16.h / cuda_fp16.h; the CPU harness
// (g++, no CUDA headers) uses the bit-exact integer versions of radam.cuh.
//
// Memory-bound design: a thread moves a pack of kLanes elements of every role, kLanes = 16 bytes
// of the narrowest role (4 floats, 2 doubles, 8 for any 16-bit role): one 16-byte vector access
// per narrow role, two for a float role beside a 16-bit one (8 floats = 2 x float4). The pack
// path runs when every pointer is 16-byte aligned at one common element index (a scalar head
// reaches it, a scalar tail finishes odd sizes); otherwise every element takes the scalar path.
// One routine (radam_apply) does this over a range for every kernel:
//   - radam_step / radam_step_capturable: one flat range, grid-stride over the whole grid;
//   - radam_step_segments / radam_step_tensors: a tile table (start, stop, index) of ranges of a
//     few thousand elements inside the segments of flat buffers, or inside separate tensors
//     reached through a pointer table; each block takes tiles in turn (grid-stride over tiles),
//     reads the tile's row of scalars once, and its threads stride over the tile;
//   - radam_step_segments_capturable: the segments' tiles, each block folding its tile's
//     scalars from the segment's step count and group row in device memory.
// Skipping (found_inf, check_finite): every update kernel takes a flag (`skip`, a pointer to a
// 0-d device value, with its type code; null: none) and returns before touching memory when it
// is nonzero. check_finite is a read-only pre-pass (prepass_*) over the active gradient
// elements that sets a device flag (also set when found_inf is), which the update kernel then
// takes as its skip flag: nothing is ever half-written, and the host never waits.
// Clipping (fastradam/clipping.py): the same pre-pass computes the gradients' global norm instead
// (its own section below says how, deterministically and without any thread waiting), torch's
// coefficient, the gradient factor inv_grad_scale * coefficient and the skip flag, all in device
// memory; every update kernel takes that factor through a pointer (`factor`; null: the tables'
// inv_grad_scale), so a clipped step is two launches the host never waits on.
// The grid is sized from the SM count by the host (the clipping norm's pre-pass: from the work
// alone, for its order of additions). Compiled with --fmad=false (see the backend).
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FASTRADAM_CUDA_FP_INTRINSICS 1
#endif
#include "radam.cuh"

// Instrumentation hooks for the CPU harness (kernels/host_shim.h counts vector and scalar
// element updates); empty on the GPU.
#ifndef FASTRADAM_COUNT_VECTOR
#define FASTRADAM_COUNT_VECTOR(elements)
#endif
#ifndef FASTRADAM_COUNT_SCALAR
#define FASTRADAM_COUNT_SCALAR()
#endif

//! Unrolls the loop that follows on the device (g++ for the harness has no such pragma: nothing).
#if defined(__CUDA_ARCH__)
#define FASTRADAM_UNROLL _Pragma("unroll")
#else
#define FASTRADAM_UNROLL
#endif

namespace fastradam {

//! The 0-d device value at `value` (type `code`: kInt8 ... kFloat64 of generated/abi.cuh; kInt8
//! reads bool, int8 and uint8, kNoValue is a flag that is never set), as a double.
__host__ __device__ __forceinline__ double read_value(const void* value, int code) {
    switch (code) {
        case kInt8: return static_cast<double>(*static_cast<const unsigned char*>(value));
        case kInt32: return static_cast<double>(*static_cast<const int*>(value));
        case kInt64: return static_cast<double>(*static_cast<const long long*>(value));
        case kFloat32: return static_cast<double>(*static_cast<const float*>(value));
        case kFloat64: return *static_cast<const double*>(value);
        default: return 0.0;
    }
}

//! Whether a skip flag is set: nonzero (NaN counts as set); kNoValue never is.
__host__ __device__ __forceinline__ bool flag_set(const void* flag, int code) {
    return code != kNoValue && read_value(flag, code) != 0.0;
}

//! kLanes elements of storage type T: one (or, for float beside a 16-bit role, two) 16-byte
//! vector accesses.
template <typename T, int kLanes>
struct alignas(16) Pack {
    T lane[kLanes];
};

template <typename A, typename B>
__host__ __device__ constexpr int min_size() {
    return sizeof(A) < sizeof(B) ? static_cast<int>(sizeof(A)) : static_cast<int>(sizeof(B));
}

//! Elements per pack: 16 bytes of the narrowest role.
template <typename P, typename G, typename Mo>
__host__ __device__ constexpr int lanes() {
    return 16 / (min_size<P, G>() < static_cast<int>(sizeof(Mo)) ? min_size<P, G>() : static_cast<int>(sizeof(Mo)));
}

__host__ __device__ __forceinline__ unsigned offset16(const void* ptr) {
    return static_cast<unsigned>(reinterpret_cast<unsigned long long>(ptr) % 16u);
}

//! Whether element `head` of `ptr` starts a 16-byte boundary (null pointers pass: absent roles).
template <typename T>
__host__ __device__ __forceinline__ bool aligned_at(const T* ptr, long long head) {
    return ptr == nullptr || offset16(ptr + head) == 0;
}

//! Elements from `ptr` to its next 16-byte boundary; -1 when it is not even element-aligned.
template <typename T>
__host__ __device__ __forceinline__ long long to_boundary(const T* ptr) {
    const unsigned offset = offset16(ptr);
    return offset % sizeof(T) != 0 ? -1 : static_cast<long long>((16u - offset) % 16u / sizeof(T));
}

//! The buffers of one step: params, grads, both moments, the keeper's side buffer (null without
//! one: K::kSide), and the global index of element 0 (read by RoundStochastic only).
template <typename P, typename G, typename Mo, typename K>
struct Buffers {
    P* __restrict__ p;
    const G* __restrict__ g;
    Mo* __restrict__ m;
    Mo* __restrict__ v;
    typename K::Side* __restrict__ side;
    long long index;

    __host__ __device__ __forceinline__ Buffers at(long long k) const {
        return Buffers{p + k, g + k, m + k, v + k, K::kSide ? side + k : nullptr, index + k};
    }
};

template <typename P, typename G, typename Mo, typename K>
using MathOf = typename MathType<P, G, Mo>::type;

//! One element, in place: load every role in math type M (the parameter through the keeper K,
//! from p and its side value w), update, store back rounded (the parameter through K, given the
//! element's global index i).
template <typename P, typename G, typename Mo, typename K, typename M>
__device__ __forceinline__ void update_element(P& p, typename K::Side& w, const G& g, Mo& m, Mo& v, long long i,
                                               const ElementScalars<M>& s) {
    M pi = K::template load<M>(p, w);
    M mi = load_as<M>(m), vi = load_as<M>(v);
    radam_element(pi, load_as<M>(g), mi, vi, s);
    K::store(p, w, pi, i, s);
    m = store_as<Mo>(mi);
    v = store_as<Mo>(vi);
}

//! Element i of the buffers.
template <typename P, typename G, typename Mo, typename K>
__device__ __forceinline__ void update_scalar(const Buffers<P, G, Mo, K>& b, long long i,
                                              const ElementScalars<MathOf<P, G, Mo, K>>& s) {
    typename K::Side unused{};
    typename K::Side& w = K::kSide ? b.side[i] : unused;
    update_element<P, G, Mo, K>(b.p[i], w, b.g[i], b.m[i], b.v[i], b.index + i, s);
    FASTRADAM_COUNT_SCALAR();
}

template <int kLanes, typename T>
__device__ __forceinline__ Pack<T, kLanes> load_pack(const T* base, long long k) {
    return reinterpret_cast<const Pack<T, kLanes>*>(base)[k];
}

template <int kLanes, typename T>
__device__ __forceinline__ void store_pack(T* base, long long k, const Pack<T, kLanes>& x) {
    reinterpret_cast<Pack<T, kLanes>*>(base)[k] = x;
}

//! Pack k (elements k * kLanes ...) of 16-byte-aligned buffers (the params read only when the
//! keeper's load reads them: K::kReadsParams).
template <typename P, typename G, typename Mo, typename K>
__device__ __forceinline__ void update_pack(const Buffers<P, G, Mo, K>& b, long long k,
                                            const ElementScalars<MathOf<P, G, Mo, K>>& s) {
    constexpr int kLanes = lanes<P, G, Mo>();
    Pack<P, kLanes> pk;
    Pack<typename K::Side, kLanes> wk;
    if constexpr (K::kSide) wk = load_pack<kLanes>(b.side, k);
    if constexpr (K::kReadsParams) pk = load_pack<kLanes>(b.p, k);
    Pack<Mo, kLanes> mk = load_pack<kLanes>(b.m, k), vk = load_pack<kLanes>(b.v, k);
    const Pack<G, kLanes> gk = load_pack<kLanes>(b.g, k);
    const long long first = b.index + k * kLanes;
    for (int j = 0; j < kLanes; ++j) {
        update_element<P, G, Mo, K>(pk.lane[j], wk.lane[j], gk.lane[j], mk.lane[j], vk.lane[j], first + j, s);
    }
    if constexpr (K::kSide) store_pack<kLanes>(b.side, k, wk);
    store_pack<kLanes>(b.p, k, pk);
    store_pack<kLanes>(b.m, k, mk);
    store_pack<kLanes>(b.v, k, vk);
    FASTRADAM_COUNT_VECTOR(kLanes);
}

//! The first element index at which every buffer is 16-byte aligned, or n (all scalar) when
//! the pointers do not share one (the head is counted in elements of the narrowest role).
template <typename P, typename G, typename Mo, typename K>
__device__ __forceinline__ long long pack_head(const Buffers<P, G, Mo, K>& b, long long n) {
    constexpr int narrow = 16 / lanes<P, G, Mo>();
    long long head = -1;
    if constexpr (sizeof(P) == narrow) {
        head = to_boundary(b.p);
    } else if constexpr (sizeof(G) == narrow) {
        head = to_boundary(b.g);
    } else {
        head = to_boundary(b.m);
    }
    if (head < 0) return n;
    head = head < n ? head : n;
    const bool coaligned = aligned_at(b.p, head) && aligned_at(b.g, head) && aligned_at(b.m, head) &&
                           aligned_at(b.v, head) && aligned_at(b.side, head);
    return coaligned ? head : n;
}

//! One RAdam step over the n elements of `b`, by threads `first`, `first + stride`, ...:
//! packs where the buffers are co-aligned, scalar head and tail (or everything scalar).
template <typename P, typename G, typename Mo, typename K>
__device__ __forceinline__ void radam_apply(const Buffers<P, G, Mo, K>& b, long long n,
                                            const ElementScalars<MathOf<P, G, Mo, K>>& s, long long first,
                                            long long stride) {
    constexpr long long width = lanes<P, G, Mo>();
    const long long head = pack_head(b, n);
    const long long packs = (n - head) / width;
    const long long body_end = head + packs * width;
    const Buffers<P, G, Mo, K> body = b.at(head);
    for (long long k = first; k < packs; k += stride) update_pack(body, k, s);
    const long long scalars = head + (n - body_end);
    for (long long k = first; k < scalars; k += stride) update_scalar(b, k < head ? k : body_end + (k - head), s);
}

__device__ __forceinline__ long long grid_thread() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_threads() { return static_cast<long long>(gridDim.x) * blockDim.x; }

//! The scalars `s` with the gradient factor of a clipped step in place of inv_grad_scale when
//! `factor` is not null: *factor (inv_grad_scale * clip coefficient, in float64, written by the norm
//! pre-pass) rounded once to the math type M.
template <typename M>
__device__ __forceinline__ ElementScalars<M> with_factor(ElementScalars<M> s, const double* factor) {
    if (factor != nullptr) s.inv_grad_scale = static_cast<M>(*factor);
    return s;
}

//! One RAdam step with host-computed scalars (already rounded to the math type M), passed by
//! value as one record (fastradam.spec.SCALARS). `side` is the keeper's side buffer (the fp32
//! master or the remainders; null without one); an element's global index is its index in the
//! buffers. `factor` is a clipped step's gradient factor (with_factor; null: s.inv_grad_scale);
//! `skip` (type `skip_code`) is found_inf or the pre-pass's flag.
template <typename P, typename G, typename Mo, typename K>
__global__ void radam_step(P* __restrict__ p, const G* __restrict__ g, Mo* __restrict__ m, Mo* __restrict__ v,
                           typename K::Side* __restrict__ side, long long n, ElementScalars<MathOf<P, G, Mo, K>> s,
                           const double* factor, const void* skip, int skip_code) {
    if (flag_set(skip, skip_code)) return;
    radam_apply(Buffers<P, G, Mo, K>{p, g, m, v, side, 0}, n, with_factor(s, factor), grid_thread(),
                grid_threads());
}

//! Columns of a tile row: the range [start, stop) of the tile inside its segment's flat
//! buffers (or inside its tensor), and the segment's (tensor's) index.
constexpr int kTileFields = 3;

//! Row `row` of the host tables: reals (R, kScalarFloats) in the math type and ints (R,
//! kScalarInts), columns as fastradam.spec.SCALARS.
template <typename M>
__device__ __forceinline__ ElementScalars<M> load_row(const M* __restrict__ floats, const int* __restrict__ ints,
                                                      int row) {
    return scalars_row(floats + static_cast<long long>(row) * kScalarFloats,
                       ints + static_cast<long long>(row) * kScalarInts);
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

//! The global index of element 0 of segment (tensor) `index`'s buffer, from the index shifts
//! (K::kIndexed only: the shifts are null otherwise, and the index unused).
template <typename K>
__device__ __forceinline__ long long index_shift(const long long* __restrict__ shifts, int index) {
    if constexpr (K::kIndexed) {
        return shifts[index];
    } else {
        return 0;
    }
}

//! One RAdam step over the segments of flat buffers, in one launch. Tile `t` covers elements
//! [start, stop) of segment `index`, which uses row segment_row[index] of floats/ints (< 0: the
//! segment is neither read nor written). Padding between segments is in no tile. `side` as for
//! radam_step; the element at buffer position k of segment i has global index k + shifts[i]
//! (RoundStochastic only; null otherwise). `factor` (every row's) and `skip` as for radam_step.
template <typename P, typename G, typename Mo, typename K>
__global__ void radam_step_segments(P* __restrict__ p, const G* __restrict__ g, Mo* __restrict__ m,
                                    Mo* __restrict__ v, typename K::Side* __restrict__ side,
                                    const long long* __restrict__ tiles, long long n_tiles,
                                    const int* __restrict__ segment_row,
                                    const MathOf<P, G, Mo, K>* __restrict__ floats, const int* __restrict__ ints,
                                    const long long* __restrict__ shifts, const double* factor, const void* skip,
                                    int skip_code) {
    if (flag_set(skip, skip_code)) return;
    for (long long tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const Tile t = load_tile(tiles, segment_row, tile);
        if (t.row < 0) continue;
        const Buffers<P, G, Mo, K> b{p, g, m, v, side, index_shift<K>(shifts, t.index)};
        radam_apply(b.at(t.start), t.stop - t.start, with_factor(load_row(floats, ints, t.row), factor), threadIdx.x,
                    blockDim.x);
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

//! Pointers per tensor in the tensor kernels' table: params, grads, exp_avg, exp_avg_sq, and the
//! keeper's side buffer when it has one.
template <typename K>
__host__ __device__ constexpr long long table_columns() {
    return K::kSide ? 5 : 4;
}

//! One RAdam step over separate tensors, in one launch: tensor `i` is the buffers at
//! pointers[c i .. c i + c - 1] (params, grads, exp_avg, exp_avg_sq, and the side buffer when
//! K::kSide); tile `t` covers elements [start, stop) of tensor `index`, which uses row
//! tensor_row[index] (< 0: skipped). Element k of tensor i has global index k + shifts[i] (the
//! sizes of the tensors before it; RoundStochastic only, null otherwise). `factor` and `skip` as
//! for radam_step_segments.
template <typename P, typename G, typename Mo, typename K>
__global__ void radam_step_tensors(void* const* __restrict__ pointers, const long long* __restrict__ tiles,
                                   long long n_tiles, const int* __restrict__ tensor_row,
                                   const MathOf<P, G, Mo, K>* __restrict__ floats, const int* __restrict__ ints,
                                   const long long* __restrict__ shifts, const double* factor, const void* skip,
                                   int skip_code) {
    if (flag_set(skip, skip_code)) return;
    for (long long tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const Tile t = load_tile(tiles, tensor_row, tile);
        if (t.row < 0) continue;
        void* const* q = pointers + table_columns<K>() * t.index;
        using Side = typename K::Side;
        const Buffers<P, G, Mo, K> b{in_global(static_cast<P*>(q[0])),
                                     in_global(static_cast<const G*>(q[1])),
                                     in_global(static_cast<Mo*>(q[2])),
                                     in_global(static_cast<Mo*>(q[3])),
                                     K::kSide ? in_global(static_cast<Side*>(q[4])) : nullptr,
                                     index_shift<K>(shifts, t.index)};
        radam_apply(b.at(t.start), t.stop - t.start, with_factor(load_row(floats, ints, t.row), factor), threadIdx.x,
                    blockDim.x);
    }
}

//! Capturable RAdam step: the step count (type code step_code: kInt32, kInt64, kFloat32 or
//! kFloat64) is read from device memory, and the learning rate too when group.lr_code is not
//! kNoValue (else group.lr is used); every thread folds the float64 scalars itself from the
//! group's row (fastradam.spec.GROUP_ROW, passed by value), so a CUDA graph replay follows the
//! values on the device. The type codes keep this one instantiation per storage. `factor` (the
//! float64 factor replacing group.inv_grad_scale, then rounded to M with the other scalars) and
//! `skip` as for radam_step.
template <typename P, typename G, typename Mo, typename K>
__global__ void radam_step_capturable(P* __restrict__ p, const G* __restrict__ g, Mo* __restrict__ m,
                                      Mo* __restrict__ v, typename K::Side* __restrict__ side, long long n,
                                      const void* step, int step_code, const void* lr, GroupRow group,
                                      const double* factor, const void* skip, int skip_code) {
    static_assert(!K::kIndexed, "stochastic rounding folds its key on the host: no capturable kernels");
    if (flag_set(skip, skip_code)) return;
    const double lr_value = group.lr_code == kNoValue ? group.lr : read_value(lr, group.lr_code);
    const ElementScalars<double> s =
        with_factor(radam_step_scalars(read_value(step, step_code), lr_value, group), factor);
    radam_apply(Buffers<P, G, Mo, K>{p, g, m, v, side, 0}, n, cast_scalars<MathOf<P, G, Mo, K>>(s), grid_thread(),
                grid_threads());
}

//! Entry `index` of a device array of type `code` (as read_value reads a 0-d one), as a double.
__host__ __device__ __forceinline__ double read_value_at(const void* values, int code, long long index) {
    switch (code) {
        case kInt8: return read_value(static_cast<const unsigned char*>(values) + index, code);
        case kInt32: return read_value(static_cast<const int*>(values) + index, code);
        case kInt64: return read_value(static_cast<const long long*>(values) + index, code);
        case kFloat32: return read_value(static_cast<const float*>(values) + index, code);
        case kFloat64: return read_value(static_cast<const double*>(values) + index, code);
        default: return 0.0;
    }
}

//! Capturable RAdam step over the segments of flat buffers, in one launch: segment `i` is in
//! group segment_group[i] (< 0: skipped, neither read nor written) and its step count is
//! steps[i] (type code step_code) in device memory. A group's row (fastradam.spec.GROUP_ROW, in
//! tables (R, kGroupFloats) and (R, kGroupInts)) holds its hyperparameters, and its learning rate
//! is read from lr_pointers[row] when the row's lr_code is not kNoValue.
//! Each block folds its tile's float64 scalars as radam_step_capturable does (operation for
//! operation the host's), so a CUDA graph replay follows the step counts on the device. `factor`
//! and `skip` as for radam_step_capturable.
template <typename P, typename G, typename Mo, typename K>
__global__ void radam_step_segments_capturable(P* __restrict__ p, const G* __restrict__ g, Mo* __restrict__ m,
                                               Mo* __restrict__ v, typename K::Side* __restrict__ side,
                                               const long long* __restrict__ tiles, long long n_tiles,
                                               const int* __restrict__ segment_group, const void* steps,
                                               int step_code, const double* __restrict__ group_floats,
                                               const int* __restrict__ group_ints,
                                               const unsigned long long* __restrict__ lr_pointers,
                                               const double* factor, const void* skip, int skip_code) {
    static_assert(!K::kIndexed, "stochastic rounding folds its key on the host: no capturable kernels");
    if (flag_set(skip, skip_code)) return;
    const Buffers<P, G, Mo, K> b{p, g, m, v, side, 0};
    for (long long tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const Tile t = load_tile(tiles, segment_group, tile);
        if (t.row < 0) continue;
        const GroupRow group = group_row(group_floats + static_cast<long long>(t.row) * kGroupFloats,
                                         group_ints + static_cast<long long>(t.row) * kGroupInts);
        const double lr = group.lr_code == kNoValue
                              ? group.lr
                              : read_value(reinterpret_cast<const void*>(lr_pointers[t.row]), group.lr_code);
        const ElementScalars<double> s =
            with_factor(radam_step_scalars(read_value_at(steps, step_code, t.index), lr, group), factor);
        radam_apply(b.at(t.start), t.stop - t.start, cast_scalars<MathOf<P, G, Mo, K>>(s), threadIdx.x,
                    blockDim.x);
    }
}

// --- The gradient pre-pass: the finite check, or the clipping norm ------------------------------
//
// One read-only pass over the active gradient elements before the update (prepass_flat,
// prepass_segments, prepass_tensors), in one of three modes, by its NormRequest:
//   - the finite check (`partials` and `given` null): *flag is set (the host zeroed it) when
//     found_inf is set or an element is NaN or infinite;
//   - the norm (`partials` given): thread t adds |g|^p (p = norm_type; kNormInf: the largest |g|,
//     NaN kept) of its elements in float64 into one accumulator per pack lane (the scalar head and
//     tail into lane 0), combines the lanes in lane order and stores the result as partials[t].
//     The partials are then combined up a tree of fan-in kFanIn: node i of a level combines values
//     kFanIn i ... kFanIn i + kFanIn - 1 of the level below in index order, done by the last of
//     those to arrive (an atomic counter per node, behind a __threadfence), which then arrives at
//     its parent; the root's combiner finishes: the norm, torch's coefficient, the gradient factor
//     inv_grad_scale * coefficient and *flag (found_inf, or check_finite and a NaN/inf norm). No
//     thread ever waits for another; the tree is a few levels deep (its serial work, a memory
//     round trip per level, stays small at any grid); and the order of every addition is fixed by
//     the grid and block sizes (the host sizes the grid from the work alone, never from the
//     device) and the grads' alignment: the same bits on every run. Each counter is left at zero
//     for the next launch.
//   - a given norm (`given` not null; launched as one thread): no gradient is read; the norm is
//     *given, and the one thread finishes as above.

//! The norm arguments of a pre-pass, gathered (their meaning above): the found_inf flag (type code)
//! and the flag written for the update; the scratch, room for 2 gridDim blockDim values (the
//! thread partials, then each level of the tree) and gridDim blockDim arrival counters (zero); a
//! given norm (type code; null: none); the outputs, the norm and the gradient factor (null: the
//! norm alone); and the request: the code of norm_type, p itself, 1 / grad_scale, max_norm and
//! check_finite.
struct NormRequest {
    const void* found_inf;
    int found_inf_code;
    int* flag;
    double* partials;
    unsigned* counters;
    const void* given;
    int given_code;
    double* norm;
    double* factor;
    int code;
    double power;
    double inv_grad_scale;
    double max_norm;
    int check_finite;
};

//! Visits the n elements of g seen by threads first, first + stride, ...: on_pack(pack) for the
//! 16-byte packs from the first 16-byte-aligned element on, on_scalar(value) for the scalar head
//! and tail (every element scalar when g is not even element-aligned).
template <typename G, typename OnPack, typename OnScalar>
__device__ __forceinline__ void visit_range(const G* __restrict__ g, long long n, long long first, long long stride,
                                            OnPack on_pack, OnScalar on_scalar) {
    constexpr int kLanes = 16 / sizeof(G);
    long long head = to_boundary(g);
    head = head < 0 ? n : (head < n ? head : n);
    const long long packs = (n - head) / kLanes;
    const long long body_end = head + packs * kLanes;
    for (long long k = first; k < packs; k += stride) on_pack(load_pack<kLanes>(g + head, k));
    const long long scalars = head + (n - body_end);
    for (long long k = first; k < scalars; k += stride) on_scalar(g[k < head ? k : body_end + (k - head)]);
}

//! Whether all n elements of g seen by threads first, first + stride, ... are finite.
template <typename G>
__device__ __forceinline__ bool range_finite(const G* __restrict__ g, long long n, long long first,
                                             long long stride) {
    constexpr int kLanes = 16 / sizeof(G);
    bool finite = true;
    visit_range(
        g, n, first, stride,
        [&](const Pack<G, kLanes>& gk) {
            for (int j = 0; j < kLanes; ++j) finite = finite && is_finite(gk.lane[j]);
        },
        [&](const G& x) { finite = finite && is_finite(x); });
    return finite;
}

//! |x|^p of a gradient value x in float64: x x for kNormTwo, |x| for kNormOne and kNormInf,
//! pow(|x|, p) for kNormPower.
template <int kCode>
__device__ __forceinline__ double magnitude(double x, double power) {
    if constexpr (kCode == kNormTwo) {
        return x * x;
    } else if constexpr (kCode == kNormPower) {
        return pow(fabs(x), power);
    } else {
        return fabs(x);
    }
}

//! One thread's running norm of norm code kCode over grads of kLanes elements per pack: one float64
//! accumulator per pack lane (element j of a pack into lane j, scalar head and tail elements into
//! lane 0), combined in lane order by total().
template <int kCode, int kLanes>
struct ThreadNorm {
    double power;
    double lane[kLanes];

    __device__ __forceinline__ void add(int j, double x) {
        lane[j] = combine_norms(kCode, lane[j], magnitude<kCode>(x, power));
    }

    //! The n elements of g seen by threads first, first + stride, ... (visit_range).
    template <typename G>
    __device__ __forceinline__ void range(const G* __restrict__ g, long long n, long long first, long long stride) {
        static_assert(kLanes == 16 / sizeof(G), "one accumulator per pack lane of the grads");
        visit_range(
            g, n, first, stride,
            [&](const Pack<G, kLanes>& gk) {
                for (int j = 0; j < kLanes; ++j) add(j, load_as<double>(gk.lane[j]));
            },
            [&](const G& x) { add(0, load_as<double>(x)); });
    }

    __device__ __forceinline__ double total() const {
        double sum = lane[0];
        for (int j = 1; j < kLanes; ++j) sum = combine_norms(kCode, sum, lane[j]);
        return sum;
    }
};

//! This thread's partial norm: `visit` (a callable taking a fresh ThreadNorm of the request's code,
//! by value, and returning its total after adding this thread's elements), the norm code a template
//! argument inside (one loop per code, chosen once).
template <typename G, typename Visit>
__device__ __forceinline__ double thread_norm(const NormRequest& r, Visit visit) {
    constexpr int kLanes = 16 / sizeof(G);
    switch (r.code) {
        case kNormTwo: return visit(ThreadNorm<kNormTwo, kLanes>{r.power, {}});
        case kNormOne: return visit(ThreadNorm<kNormOne, kLanes>{r.power, {}});
        case kNormInf: return visit(ThreadNorm<kNormInf, kLanes>{r.power, {}});
        default: return visit(ThreadNorm<kNormPower, kLanes>{r.power, {}});
    }
}

//! A value another thread stored before a __threadfence, read from memory (not a stale cache line).
__device__ __forceinline__ double load_stored(const double* value) {
    return *static_cast<const volatile double*>(value);
}

//! The end of a norm pre-pass, by the one thread that finishes it: the norm of the step, the
//! gradient factor inv_grad_scale * clip_coefficient(norm, max_norm) (unless only the norm is
//! asked) and the update's flag: found_inf, or check_finite and a NaN/inf norm.
__device__ __forceinline__ void finish_norm(const NormRequest& r, double norm) {
    *r.norm = norm;
    if (r.factor != nullptr) *r.factor = r.inv_grad_scale * clip_coefficient(norm, r.max_norm);
    if (r.flag != nullptr) {
        *r.flag = flag_set(r.found_inf, r.found_inf_code) || (r.check_finite && !is_finite(norm)) ? 1 : 0;
    }
}

//! Fan-in of the norm pre-pass's reduction tree: the last of kFanIn siblings to arrive combines them.
constexpr unsigned kFanIn = 16;

//! The first `count` (1 ... kFanIn) of the values at `values` other threads stored, combined in
//! index order; loaded together (independent loads in flight at once: one memory round trip).
__device__ __forceinline__ double combine_stored(int code, const double* values, unsigned count) {
    double loaded[kFanIn];
    FASTRADAM_UNROLL
    for (unsigned i = 0; i < kFanIn; ++i) loaded[i] = i < count ? load_stored(values + i) : 0.0;
    double total = loaded[0];
    FASTRADAM_UNROLL
    for (unsigned i = 1; i < kFanIn; ++i) total = i < count ? combine_norms(code, total, loaded[i]) : total;
    return total;
}

//! Stores this thread's partial norm and climbs the reduction tree over the grid's partials while it
//! is the last of its siblings to arrive (the tree above: each level's values after the level below
//! in r.partials, each level's node counters after the one below in r.counters); the root's combiner
//! finishes (finish_norm). Every thread of the grid calls it once; none waits.
__device__ __forceinline__ void gather_norm(const NormRequest& r, double partial) {
    long long size = grid_threads();  // values at this level
    long long index = grid_thread();  // this thread's value at this level
    double* values = r.partials;
    unsigned* counters = r.counters;  // the counters of the nodes above this level
    values[index] = partial;
    while (size > 1) {
        const long long node = index / kFanIn;
        const long long first = node * kFanIn;
        const unsigned siblings = static_cast<unsigned>(size - first < kFanIn ? size - first : kFanIn);
        __threadfence();
        if (atomicAdd(counters + node, 1u) != siblings - 1) return;
        __threadfence();
        partial = combine_stored(r.code, values + first, siblings);
        counters[node] = 0;
        const long long nodes = (size + kFanIn - 1) / kFanIn;
        values += size;
        counters += nodes;
        values[node] = partial;
        size = nodes;
        index = node;
    }
    finish_norm(r, norm_of_total(partial, r.code, r.power, r.inv_grad_scale));
}

//! The norm modes of a pre-pass: a given norm (finished by thread 0), or this thread's elements by
//! `visit` (thread_norm) gathered; false when the request is the finite check.
template <typename G, typename Visit>
__device__ __forceinline__ bool norm_pass(const NormRequest& r, Visit visit) {
    if (r.given != nullptr) {
        if (grid_thread() == 0) finish_norm(r, read_value(r.given, r.given_code));
        return true;
    }
    if (r.partials == nullptr) return false;
    gather_norm(r, thread_norm<G>(r, visit));
    return true;
}

//! The finite check: whether found_inf is set; if so, thread 0 sets *flag (the pre-pass then reads nothing).
__device__ __forceinline__ bool passed_on(const NormRequest& r) {
    if (!flag_set(r.found_inf, r.found_inf_code)) return false;
    if (grid_thread() == 0) *r.flag = 1;
    return true;
}

//! The pre-pass of request `r` (the modes above) over the ranges of gradients this thread takes:
//! each_range(on_range) calls on_range(g, n) for each of them, whose elements the thread visits
//! from `first` by `stride`. Reads nothing else, writes nothing else.
template <typename G, typename EachRange>
__device__ __forceinline__ void prepass(const NormRequest& r, EachRange each_range, long long first,
                                        long long stride) {
    const auto elements = [&](auto accumulator) {
        each_range([&](const G* g, long long n) { accumulator.range(g, n, first, stride); });
        return accumulator.total();
    };
    if (norm_pass<G>(r, elements) || passed_on(r)) return;
    bool finite = true;
    each_range([&](const G* g, long long n) { finite = range_finite(g, n, first, stride) && finite; });
    if (!finite) *r.flag = 1;
}

//! Calls on_tile(t) for each active tile (row >= 0) this block takes: tiles blockIdx.x, + gridDim.x, ...
template <typename OnTile>
__device__ __forceinline__ void block_tiles(const long long* __restrict__ tiles, long long n_tiles,
                                            const int* __restrict__ index_row, OnTile on_tile) {
    for (long long tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const Tile t = load_tile(tiles, index_row, tile);
        if (t.row >= 0) on_tile(t);
    }
}

//! The pre-pass over the n gradient elements of flat buffers, grid-stride (a given norm is
//! launched here, with n = 0).
template <typename G>
__global__ void prepass_flat(const G* __restrict__ g, long long n, const void* found_inf, int found_inf_code,
                             int* flag, double* partials, unsigned* counters, const void* given, int given_code,
                             double* norm, double* factor, int code, double power, double inv_grad_scale,
                             double max_norm, int check_finite) {
    const NormRequest r{found_inf, found_inf_code, flag, partials, counters, given, given_code, norm, factor,
                        code, power, inv_grad_scale, max_norm, check_finite};
    prepass<G>(r, [&](auto on_range) { on_range(g, n); }, grid_thread(), grid_threads());
}

//! The pre-pass over the active tiles of a layout's segments (skipped ones and padding unread),
//! each block taking tiles in turn, its threads striding over each.
template <typename G>
__global__ void prepass_segments(const G* __restrict__ g, const long long* __restrict__ tiles, long long n_tiles,
                                 const int* __restrict__ segment_row, const void* found_inf, int found_inf_code,
                                 int* flag, double* partials, unsigned* counters, const void* given,
                                 int given_code, double* norm, double* factor, int code, double power,
                                 double inv_grad_scale, double max_norm, int check_finite) {
    const NormRequest r{found_inf, found_inf_code, flag, partials, counters, given, given_code, norm, factor,
                        code, power, inv_grad_scale, max_norm, check_finite};
    const auto each_range = [&](auto on_range) {
        block_tiles(tiles, n_tiles, segment_row, [&](const Tile& t) { on_range(g + t.start, t.stop - t.start); });
    };
    prepass<G>(r, each_range, threadIdx.x, blockDim.x);
}

//! prepass_segments over the active tiles of a tensor list (grads: column 1 of the pointer table).
template <typename G>
__global__ void prepass_tensors(void* const* __restrict__ pointers, long long columns,
                                const long long* __restrict__ tiles, long long n_tiles,
                                const int* __restrict__ tensor_row, const void* found_inf, int found_inf_code,
                                int* flag, double* partials, unsigned* counters, const void* given, int given_code,
                                double* norm, double* factor, int code, double power, double inv_grad_scale,
                                double max_norm, int check_finite) {
    const NormRequest r{found_inf, found_inf_code, flag, partials, counters, given, given_code, norm, factor,
                        code, power, inv_grad_scale, max_norm, check_finite};
    const auto each_range = [&](auto on_range) {
        block_tiles(tiles, n_tiles, tensor_row, [&](const Tile& t) {
            const G* g = in_global(static_cast<const G*>(pointers[columns * t.index + 1]));
            on_range(g + t.start, t.stop - t.start);
        });
    };
    prepass<G>(r, each_range, threadIdx.x, blockDim.x);
}

}  // namespace fastradam
