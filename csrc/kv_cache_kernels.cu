// CUDA kernels of the KV-cache ops: plain CUDA C++ on raw pointers (the ATen glue is in kv_cache.cpp),
// so this translation unit compiles with nvcc alone (tests/test_kv_ops.py does exactly that).
#include <algorithm>

#include "kv_cache.h"

namespace se_kv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride beyond this: plenty to fill any current GPU

// One thread per Vec of every unit; consecutive threads walk a unit's contiguous bytes (coalesced).
template <class Vec, class Step>
__global__ void copy_units(Step step, int64_t vecs_per_unit) {
  const int64_t total = step.units() * vecs_per_unit;
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < total; t += int64_t{gridDim.x} * blockDim.x) {
    const Copy c = step(t / vecs_per_unit);
    const int64_t i = t % vecs_per_unit;
    reinterpret_cast<Vec*>(c.dst)[i] = reinterpret_cast<const Vec*>(c.src)[i];
  }
}

template <class Vec, class Step>
cudaError_t launch_as(const Step& step, cudaStream_t stream) {
  const int64_t vecs = step.unit_bytes() / sizeof(Vec);
  const int64_t blocks = std::min(kMaxBlocks, (step.units() * vecs + kThreads - 1) / kThreads);
  copy_units<Vec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(step, vecs);
  return cudaGetLastError();
}

// `align` is the OR of every unit's start address and its size: its lowest set bit bounds the access width.
template <class Step>
cudaError_t launch(const Step& step, uintptr_t align, cudaStream_t stream) {
  if (step.units() == 0 || step.unit_bytes() == 0) return cudaSuccess;
  if (align % 16 == 0) return launch_as<uint4>(step, stream);
  if (align % 8 == 0) return launch_as<uint2>(step, stream);
  if (align % 4 == 0) return launch_as<uint32_t>(step, stream);
  if (align % 2 == 0) return launch_as<uint16_t>(step, stream);
  return launch_as<uint8_t>(step, stream);
}

uintptr_t cache_align(const CacheView& c) {
  return reinterpret_cast<uintptr_t>(c.k) | reinterpret_cast<uintptr_t>(c.v) | static_cast<uintptr_t>(c.row_bytes);
}

}  // namespace

cudaError_t launch_compact(const CacheView& cache, char* staging, const int64_t* slot, const int64_t* src,
                           const int64_t* dst, int64_t n, cudaStream_t stream) {
  const uintptr_t align = cache_align(cache) | reinterpret_cast<uintptr_t>(staging);
  // Two launches on one stream: the scatter starts only after the whole gather has finished.
  const cudaError_t err = launch(CompactStep{cache, staging, slot, src, dst, n, false}, align, stream);
  if (err != cudaSuccess) return err;
  return launch(CompactStep{cache, staging, slot, src, dst, n, true}, align, stream);
}

cudaError_t launch_fork(const CacheView& cache, int64_t src_slot, const int64_t* dst_slots, int64_t n,
                        int64_t length, cudaStream_t stream) {
  return launch(ForkStep{cache, src_slot, dst_slots, n, length}, cache_align(cache), stream);
}

}  // namespace se_kv
