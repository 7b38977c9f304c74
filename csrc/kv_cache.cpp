// torch ops se_kv::compact and se_kv::fork over all layers' K and V caches (validation, the CPU
// implementation and, in the CUDA build (SE_KV_CUDA), the glue to the kernels of kv_cache_kernels.cu),
// and se_kv::write of one layer's new entries (CPU).
#include <Python.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#ifdef SE_KV_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kv_cache.h"

namespace se_kv {
namespace {

void check_caches(const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(k.dim() == 5, "k_cache must be [L, B, Hkv, S, D], got shape ", k.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k_cache ", k.sizes(), " and v_cache ", v.sizes(), " differ in shape");
  TORCH_CHECK_TYPE(k.scalar_type() == v.scalar_type(), "k_cache is ", k.scalar_type(), ", v_cache ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == v.device(), "k_cache is on ", k.device(), ", v_cache on ", v.device());
  TORCH_CHECK_VALUE(k.is_contiguous() && v.is_contiguous(), "k_cache and v_cache must be contiguous");
}

// Index lists are host metadata (the engine keeps cache lengths on the host): they are validated here
// without a device sync, and uploaded only for a CUDA cache.
at::Tensor host_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  return t.contiguous();
}

void check_range(const int64_t* p, int64_t n, const char* name, int64_t bound, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(0 <= p[i] && p[i] < bound, name, "[", i, "] = ", p[i], " is out of range for ", bound, " ", what);
  }
}

CacheView view_of(const at::Tensor& k, const at::Tensor& v) {
  return {static_cast<char*>(k.data_ptr()), static_cast<char*>(v.data_ptr()), k.size(0), k.size(1), k.size(2),
          k.size(3), k.size(4) * static_cast<int64_t>(k.element_size())};
}

// [3, n] int64 on the host: rows slots, src, dst, each checked; (slot, dst) pairs must be distinct,
// else the result would depend on the order of the writes.
at::Tensor compact_index(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, const at::Tensor& src,
                         const at::Tensor& dst) {
  check_caches(k, v);
  const at::Tensor lists[] = {host_index(slots, "slots"), host_index(src, "src"), host_index(dst, "dst")};
  TORCH_CHECK_VALUE(lists[1].numel() == lists[0].numel() && lists[2].numel() == lists[0].numel(),
                    "slots, src and dst differ in length: ", lists[0].numel(), ", ", lists[1].numel(), ", ",
                    lists[2].numel());
  const at::Tensor index = at::stack(lists);
  const int64_t n = index.size(1), B = k.size(1), S = k.size(3);
  const int64_t* p = index.data_ptr<int64_t>();
  check_range(p, n, "slots", B, "cache slots");
  check_range(p + n, n, "src", S, "cache positions");
  check_range(p + 2 * n, n, "dst", S, "cache positions");
  std::vector<int64_t> written(n);
  for (int64_t i = 0; i < n; ++i) written[i] = p[i] * S + p[2 * n + i];
  std::sort(written.begin(), written.end());
  const auto twice = std::adjacent_find(written.begin(), written.end());
  TORCH_CHECK_VALUE(twice == written.end(), "compact writes slot ", *twice / S, " position ", *twice % S, " twice");
  return index;
}

at::Tensor fork_index(const at::Tensor& k, const at::Tensor& v, int64_t src_slot, const at::Tensor& dst_slots,
                      int64_t length) {
  check_caches(k, v);
  const at::Tensor index = host_index(dst_slots, "dst_slots");
  const int64_t n = index.numel(), B = k.size(1), S = k.size(3);
  const int64_t* p = index.data_ptr<int64_t>();
  TORCH_CHECK_INDEX(0 <= src_slot && src_slot < B, "src_slot ", src_slot, " is out of range for ", B, " cache slots");
  check_range(p, n, "dst_slots", B, "cache slots");
  TORCH_CHECK_VALUE(std::find(p, p + n, src_slot) == p + n, "dst_slots contains src_slot ", src_slot);
  TORCH_CHECK_INDEX(0 <= length && length <= S, "length ", length, " is out of range for capacity ", S);
  return index;
}

at::Tensor staging_for(const at::Tensor& k, int64_t n) {
  return at::empty({2 * n * k.size(0) * k.size(2) * k.size(4) * static_cast<int64_t>(k.element_size())},
                   k.options().dtype(at::kByte));
}

template <class Step>
void run_cpu(const Step& step) {
  const int64_t bytes = step.unit_bytes();
  if (bytes == 0) return;
  // Each task copies at least ~32 KiB (ATen's grain size, in bytes): small ops stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / bytes);
  at::parallel_for(0, step.units(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const Copy c = step(u);
      std::memcpy(c.dst, c.src, bytes);
    }
  });
}

void compact_cpu(at::Tensor k, at::Tensor v, const at::Tensor& slots, const at::Tensor& src, const at::Tensor& dst) {
  const at::Tensor index = compact_index(k, v, slots, src, dst);
  const int64_t n = index.size(1);
  const at::Tensor staging = staging_for(k, n);
  const int64_t* p = index.data_ptr<int64_t>();
  const CompactStep gather{view_of(k, v), static_cast<char*>(staging.data_ptr()), p, p + n, p + 2 * n, n, false};
  run_cpu(gather);
  CompactStep scatter = gather;
  scatter.scatter = true;
  run_cpu(scatter);
}

void fork_cpu(at::Tensor k, at::Tensor v, int64_t src_slot, const at::Tensor& dst_slots, int64_t length) {
  const at::Tensor index = fork_index(k, v, src_slot, dst_slots, length);
  run_cpu(ForkStep{view_of(k, v), src_slot, index.data_ptr<int64_t>(), index.numel(), length});
}

// One layer's K, V of n new tokens into its caches [B, Hkv, S, D]: token t's heads at (slots[t],
// positions[t]). k, v: [n, Hkv, D], any strides but a contiguous last dim (v is a view into the fused q/k/v output).
void write_cpu(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots_in, const at::Tensor& positions_in,
               const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
                    "k_cache and v_cache must be one layer's [B, Hkv, S, D], got ", k_cache.sizes(), " and ",
                    v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  const at::Tensor slots = host_index(slots_in, "slots"), positions = host_index(positions_in, "positions");
  const int64_t n = slots.numel(), B = k_cache.size(0), H = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK_VALUE(positions.numel() == n, "slots and positions differ in length: ", n, ", ", positions.numel());
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == n && t->size(1) == H && t->size(2) == D && t->stride(2) == 1,
                      "k and v must be [", n, ", ", H, ", ", D, "] with a contiguous last dim, got ", t->sizes(),
                      " strides ", t->strides());
    TORCH_CHECK_TYPE(t->scalar_type() == k_cache.scalar_type() && t->device().is_cpu(), "k and v must be ",
                     k_cache.scalar_type(), " CPU tensors like the caches");
  }
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  check_range(sp, n, "slots", B, "cache slots");
  check_range(pp, n, "positions", S, "cache positions");
  // The layer as a one-layer cache: CacheView's addressing.
  const CacheView cache{static_cast<char*>(k_cache.data_ptr()), static_cast<char*>(v_cache.data_ptr()), 1, B, H, S,
                        D * static_cast<int64_t>(k_cache.element_size())};
  const at::Tensor* src[2] = {&k, &v};
  for (int c = 0; c < 2; ++c) {
    const char* base = static_cast<const char*>(src[c]->data_ptr());
    const int64_t st = src[c]->stride(0) * src[c]->element_size(), sh = src[c]->stride(1) * src[c]->element_size();
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(cache.row(c, 0, sp[t], h, pp[t]), base + t * st + h * sh, cache.row_bytes);
  }
}

#ifdef SE_KV_CUDA
void compact_cuda(at::Tensor k, at::Tensor v, const at::Tensor& slots, const at::Tensor& src, const at::Tensor& dst) {
  const at::Tensor host = compact_index(k, v, slots, src, dst);
  const int64_t n = host.size(1);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  // non_blocking from pageable memory returns once the source is staged by the driver: no sync, and
  // `host` may be freed right after.
  const at::Tensor index = host.to(k.device(), at::kLong, /*non_blocking=*/true);
  const at::Tensor staging = staging_for(k, n);
  const int64_t* p = index.data_ptr<int64_t>();
  C10_CUDA_CHECK(launch_compact(view_of(k, v), static_cast<char*>(staging.data_ptr()), p, p + n, p + 2 * n, n,
                                c10::cuda::getCurrentCUDAStream()));
}

void fork_cuda(at::Tensor k, at::Tensor v, int64_t src_slot, const at::Tensor& dst_slots, int64_t length) {
  const at::Tensor host = fork_index(k, v, src_slot, dst_slots, length);
  if (host.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor index = host.to(k.device(), at::kLong, /*non_blocking=*/true);
  C10_CUDA_CHECK(launch_fork(view_of(k, v), src_slot, index.data_ptr<int64_t>(), index.numel(), length,
                             c10::cuda::getCurrentCUDAStream()));
}
#endif

}  // namespace

TORCH_LIBRARY(se_kv, m) {
  m.def("compact(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor src, Tensor dst) -> ()");
  m.def("fork(Tensor(a!) k_cache, Tensor(b!) v_cache, int src_slot, Tensor dst_slots, int length) -> ()");
  m.def("write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor positions, Tensor k, Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(se_kv, CPU, m) {
  m.impl("compact", &compact_cpu);
  m.impl("fork", &fork_cpu);
  m.impl("write", &write_cpu);
}

#ifdef SE_KV_CUDA
TORCH_LIBRARY_IMPL(se_kv, CUDA, m) {
  m.impl("compact", &compact_cuda);
  m.impl("fork", &fork_cuda);
}
#endif

}  // namespace se_kv

// `import se_engine._kv` loads this library, whose static initialisers register the ops above.
extern "C" PyMODINIT_FUNC PyInit__kv() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kv", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
