// What the CPU kernels of the extension (invariant_cpu.cpp, quant_cpu.cpp) share: the run-time choice of
// their AVX512 paths, the threading grain, the tables of their register tiles.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#define SE_X86 1
#endif

namespace se_cpu {

// SE_ENGINE_PORTABLE_KERNELS=1 forces the portable loops (tests of the path other CPUs take).
inline bool has_avx512_bf16() {
#ifdef SE_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
                         std::getenv("SE_ENGINE_PORTABLE_KERNELS") == nullptr;
  return ok;
#else
  return false;
#endif
}

// Items of `size` elements (or multiply-adds) each per thread, at least 64 Ki per thread: small
// calls (a decode step's rope, a tiny model's layers) run inline, since waking the other
// threads costs more than that work.
inline int64_t grain(int64_t size) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(size, 1)); }

// A kernel's register tiles by (rows - 1, outputs - 1), so that the tails of M and N take smaller
// tiles: Kernels::pick<R, C>() is the R x C tile function (its fast or its portable path).
template <typename Kernels, int R, std::size_t... C>
auto tile_row(std::index_sequence<C...>) {
  return std::array{Kernels::template pick<R, static_cast<int>(C) + 1>()...};
}

template <typename Kernels, int COLS, std::size_t... R>
auto tile_table(std::index_sequence<R...>) {
  return std::array{tile_row<Kernels, static_cast<int>(R) + 1>(std::make_index_sequence<COLS>())...};
}

template <typename Kernels, int ROWS, int COLS>
const auto& tiles() {
  static const auto table = tile_table<Kernels, COLS>(std::make_index_sequence<ROWS>());
  return table;
}

}  // namespace se_cpu
