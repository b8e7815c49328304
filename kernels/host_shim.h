// Host shim: lets g++ compile kernels/radam.cu unchanged for the CPU test harness
// (tests/cuda_harness.cpp). Not shipped, never seen by NVRTC.
//
// It defines the CUDA qualifiers away, provides threadIdx/blockIdx/blockDim/gridDim as globals,
// counts vector and scalar element updates through radam.cu's hooks, and launches a kernel by
// running every (block, thread) pair in turn (the kernels never synchronise, so that is exact).
// The norm pre-pass's atomicAdd and __threadfence are plain on one thread: the last thread of a
// block to arrive is its last, the last block the grid's.
#pragma once

#include <cmath>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

using std::fabs;
using std::pow;
using std::sqrt;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

//! CUDA's atomicAdd on an unsigned int: returns the old value (one thread runs at a time).
inline unsigned atomicAdd(unsigned* address, unsigned value) {
    const unsigned old = *address;
    *address = old + value;
    return old;
}
//! Orders memory accesses across the device: nothing to order on one thread.
inline void __threadfence() {}

//! Elements updated through 16-byte packs and one at a time since the last reset.
struct ElementCounts {
    long long vector = 0;
    long long scalar = 0;
};
inline ElementCounts element_counts;

#define FASTRADAM_COUNT_VECTOR(elements) (element_counts.vector += (elements))
#define FASTRADAM_COUNT_SCALAR() (++element_counts.scalar)

//! Runs kernel<<<grid, block>>>(args...) sequentially on the host.
template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned block, Kernel kernel, Args... args) {
    gridDim.x = grid;
    blockDim.x = block;
    for (blockIdx.x = 0; blockIdx.x < grid; ++blockIdx.x) {
        for (threadIdx.x = 0; threadIdx.x < block; ++threadIdx.x) kernel(args...);
    }
}
