// Addressing of the KV-cache ops, shared by the CPU loop (kv_cache.cpp) and the CUDA kernels
// (kv_cache_kernels.cu). Plain C++: no ATen, so nvcc compiles the kernels without the torch headers.
//
// A cache is a contiguous [L, B, H, S, D] tensor: rows of D elements (row_bytes bytes) indexed by
// (layer, slot, head, position). Every op is a list of independent byte copies ("units") over the
// K and V caches; a step maps a unit number to its destination and source.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SE_KV_HD __host__ __device__
#else
#define SE_KV_HD
#endif

namespace se_kv {

struct CacheView {
  char* k;
  char* v;
  int64_t layers, slots, heads, capacity, row_bytes;

  SE_KV_HD char* row(int64_t cache, int64_t layer, int64_t slot, int64_t head, int64_t position) const {
    return (cache == 0 ? k : v) + (((layer * slots + slot) * heads + head) * capacity + position) * row_bytes;
  }
};

struct Copy {
  char* dst;
  const char* src;
};

// Units enumerate (cache, entry, layer, head), head fastest: entry `e` of an index list of length n.
struct Unit {
  int64_t cache, entry, layer, head;
};

SE_KV_HD inline Unit unit_of(const CacheView& c, int64_t n, int64_t u) {
  return {u / (n * c.layers * c.heads), u / (c.layers * c.heads) % n, u / c.heads % c.layers, u % c.heads};
}

// compact: entry i moves row (slot[i], src[i]) to (slot[i], dst[i]) in every layer and head, in two
// passes through a staging buffer [2, n, L, H] rows (gather, then scatter), so every source is read
// before any destination is written and overlapping src/dst lists need no ordering.
struct CompactStep {
  CacheView cache;
  char* staging;
  const int64_t* slot;
  const int64_t* src;
  const int64_t* dst;
  int64_t n;
  bool scatter;

  SE_KV_HD int64_t units() const { return 2 * n * cache.layers * cache.heads; }
  SE_KV_HD int64_t unit_bytes() const { return cache.row_bytes; }
  SE_KV_HD Copy operator()(int64_t u) const {
    const Unit t = unit_of(cache, n, u);
    char* staged = staging + u * cache.row_bytes;
    if (scatter) return {cache.row(t.cache, t.layer, slot[t.entry], t.head, dst[t.entry]), staged};
    return {staged, cache.row(t.cache, t.layer, slot[t.entry], t.head, src[t.entry])};
  }
};

// fork: the first `length` positions of one (layer, slot, head) are contiguous, so a unit copies
// that whole prefix from src_slot to dst_slots[j].
struct ForkStep {
  CacheView cache;
  int64_t src_slot;
  const int64_t* dst_slots;
  int64_t n, length;

  SE_KV_HD int64_t units() const { return 2 * n * cache.layers * cache.heads; }
  SE_KV_HD int64_t unit_bytes() const { return length * cache.row_bytes; }
  SE_KV_HD Copy operator()(int64_t u) const {
    const Unit t = unit_of(cache, n, u);
    return {cache.row(t.cache, t.layer, dst_slots[t.entry], t.head, 0), cache.row(t.cache, t.layer, src_slot, t.head, 0)};
  }
};

}  // namespace se_kv

#if defined(__CUDACC__) || defined(SE_KV_CUDA)
#include <cuda_runtime_api.h>

namespace se_kv {

// Host launchers (kv_cache_kernels.cu). Pointers are device pointers; slot/src/dst and dst_slots hold
// validated indices; staging holds 2 * n * L * H * row_bytes bytes. Both only enqueue on `stream`.
cudaError_t launch_compact(const CacheView& cache, char* staging, const int64_t* slot, const int64_t* src,
                           const int64_t* dst, int64_t n, cudaStream_t stream);
cudaError_t launch_fork(const CacheView& cache, int64_t src_slot, const int64_t* dst_slots, int64_t n,
                        int64_t length, cudaStream_t stream);

}  // namespace se_kv
#endif
