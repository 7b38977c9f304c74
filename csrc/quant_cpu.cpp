// torch ops se_q::int4_linear, a weight-only int4 matmul for a few rows of bf16 activations (drafters), and
// se_q::int4_dequantize, its weight in bf16 for many rows.
//
// Layout (packed by se_engine/quant.py): inputs in groups of GROUP = 32, blocks of 4 groups; K is
// padded to whole blocks (code 8, scale and zero 0). Output n's codes q in [0, 15] take 64 bytes per
// block, byte j holding input j of the block in its low nibble and input 64 + j in its high one.
// scale_zero [N, 2, G] bf16 (G: 4 per block): output n's scales s, then its zeros z, so that
// W[n, k] = (q - 8) s + z.
//
// As llama.cpp's q4 x q8 dot products do, each group of a row of x is quantized to int8 first:
// d_g = max |x_g| / 127, x8 = round(x / d_g). Then, per output n and row m, in fp32,
//     y[m, n] = bf16(sum_g s_g d_g sum_{k in g} q_k x8_k  +  sum_g (z_g X_g - 8 s_g d_g X8_g)  +  b[n])
// with X_g = sum_{k in g} x_k and X8_g = sum_{k in g} x8_k; the inner sums are exact int32 (AVX512-VNNI
// vpdpbusd, 64 products an instruction). Not batch-invariant: a drafter only proposes, and the
// acceptance test keeps the output exact.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_features.h"

namespace se_q {
namespace {

using bf16 = c10::BFloat16;

constexpr int64_t GROUP = 32, BLOCK = 4 * GROUP, BLOCK_BYTES = BLOCK / 2;
constexpr int ROW_TILE = 4;  // rows of x per register tile (each further chunk of rows streams the weights again)
constexpr int COL_TILE = 4;  // outputs per register tile
// The codes are prefetched into L2 this far ahead of a tile's stream (the scales and zeros a quarter as far:
// they stream a quarter as fast); a thread's tiles are contiguous, so the stream runs on across them.
constexpr int64_t PREFETCH_BYTES = 8192;

// Input k's code in an output's packed row.
inline int code_at(const uint8_t* row, int64_t k) {
  const int64_t j = k % BLOCK;
  const uint8_t byte = row[k / BLOCK * BLOCK_BYTES + j % BLOCK_BYTES];
  return j < BLOCK_BYTES ? byte & 0xF : byte >> 4;
}

// x's rows quantized per group (padded to whole blocks with zeros), and what the sums need of them.
struct QuantizedRows {
  int64_t K, G;                // padded inputs and groups per row
  std::vector<int8_t> x8;      // [M, K]
  std::vector<float> d_lanes;  // [M, G / 2, 16]: d_g of a pair of groups, 8 lanes each (vpdpbusd's lanes)
  std::vector<float> sums;     // [M, 2, G]: X_g, then 8 d_g X8_g

  QuantizedRows(const bf16* x, int64_t M, int64_t in_features, int64_t groups)
      : K(groups * GROUP), G(groups), x8(M * K), d_lanes(M * G * 8), sums(M * 2 * G) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * GROUP, k1 = std::min(in_features, k0 + GROUP);
        float amax = 0.f, sum = 0.f;
        for (int64_t k = k0; k < k1; ++k) {
          amax = std::max(amax, std::fabs(static_cast<float>(x[m * in_features + k])));
          sum += static_cast<float>(x[m * in_features + k]);
        }
        const float dg = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum8 = 0;
        for (int64_t k = k0; k < k0 + GROUP; ++k) {
          const float xk = k < k1 ? static_cast<float>(x[m * in_features + k]) : 0.f;
          const int8_t q = static_cast<int8_t>(std::nearbyint(xk * inv));
          x8[m * K + k] = q;
          sum8 += q;
        }
        for (int i = 0; i < 8; ++i) d_lanes[(m * G + g) * 8 + i] = dg;
        sums[m * 2 * G + g] = sum;
        sums[m * 2 * G + G + g] = 8.f * dg * static_cast<float>(sum8);
      }
    }
  }
};

// Portable twin of the tile below (the same sums, the exact part in int32).
template <int R, int C>
void tile_portable(const QuantizedRows& x, int64_t m0, const uint8_t* codes, const bf16* sz, const bf16* bias, bf16* y,
                   int64_t ldy) {
  const int64_t K = x.K, G = x.G, row_bytes = K / 2;
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    for (int c = 0; c < C; ++c) {
      const uint8_t* row = codes + c * row_bytes;
      const bf16* s = sz + c * 2 * G;
      float total = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; ++k) dot += code_at(row, k) * x.x8[m * K + k];
        total += static_cast<float>(s[g]) * x.d_lanes[(m * G + g) * 8] * static_cast<float>(dot);
      }
      for (int64_t g = 0; g < G; ++g)
        total += static_cast<float>(s[G + g]) * x.sums[m * 2 * G + g] -
                 static_cast<float>(s[g]) * x.sums[m * 2 * G + G + g];
      y[r * ldy + c] = bf16(total + (bias ? static_cast<float>(bias[c]) : 0.f));
    }
  }
}

#ifdef SE_X86
#define SE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

// acc[r] += cvt(q . x8[r]) s d[r] over one pair of groups: codes q (64 bytes), scales s (8 lanes per group).
template <int R>
SE_AVX512 __attribute__((always_inline)) inline void pair_step(__m512 (&acc)[R], __m512i q, __m512 s, const int8_t* x8,
                                                               int64_t K, const float* d_lanes, int64_t d_stride) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(x8 + r * K));
    const __m512 scale = _mm512_mul_ps(s, _mm512_loadu_ps(d_lanes + r * d_stride));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
  }
}

template <int R, int C>
SE_AVX512 void tile_avx512(const QuantizedRows& x, int64_t m0, const uint8_t* codes, const bf16* sz, const bf16* bias,
                           bf16* y, int64_t ldy) {
  const int64_t K = x.K, G = x.G, row_bytes = K / 2, d_stride = G * 8;
  const int8_t* x8 = x.x8.data() + m0 * K;
  const float* d_lanes = x.d_lanes.data() + m0 * d_stride;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  // Words 0 .. 3 of a vector hold a block's 4 scales: each pair's goes to the high words of its 8 lanes
  // (the low words zeroed): fp32 scales, exactly.
  const __m512i first = _mm512_set_epi32(0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0, 0,
                                         0, 0, 0, 0, 0, 0);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(0x20000));
  constexpr __mmask32 HIGH_WORDS = 0xAAAAAAAA;
  __m512 acc[C][R];
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < G / 4; ++b) {
    const char* ahead = reinterpret_cast<const char*>(codes) + PREFETCH_BYTES + b * C * BLOCK_BYTES;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm_prefetch(ahead + c * 64, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(sz) + PREFETCH_BYTES / 4 + b * C * 16, _MM_HINT_T1);
    // One output at a time, so that only its decoded block shares the registers with the R x C sums.
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m512i v = _mm512_loadu_si512(codes + c * row_bytes + b * BLOCK_BYTES);
      const __m512i scales =
          _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sz + c * 2 * G + 4 * b)));
      const __m512 s01 = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(HIGH_WORDS, first, scales));
      const __m512 s23 = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(HIGH_WORDS, second, scales));
      pair_step<R>(acc[c], _mm512_and_si512(v, nibble), s01, x8 + b * BLOCK, K, d_lanes + b * 32, d_stride);
      pair_step<R>(acc[c], _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), s23, x8 + b * BLOCK + 64, K,
                   d_lanes + b * 32 + 16, d_stride);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float* sums = x.sums.data() + (m0 + r) * 2 * G;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      __m512 total = acc[c][r];
      for (int64_t g0 = 0; g0 < G; g0 += 16) {  // + sum_g z_g X_g - s_g (8 d_g X8_g)
        const __mmask16 mask = G - g0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (G - g0)) - 1);
        const __m512 s = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask, sz + c * 2 * G + g0));
        const __m512 z = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask, sz + c * 2 * G + G + g0));
        total = _mm512_fmadd_ps(z, _mm512_maskz_loadu_ps(mask, sums + g0), total);
        total = _mm512_fnmadd_ps(s, _mm512_maskz_loadu_ps(mask, sums + G + g0), total);
      }
      y[r * ldy + c] = bf16(_mm512_reduce_add_ps(total) + (bias ? static_cast<float>(bias[c]) : 0.f));
    }
  }
}
#endif

using TileFn = void (*)(const QuantizedRows&, int64_t, const uint8_t*, const bf16*, const bf16*, bf16*, int64_t);

bool has_avx512_vnni() {
#ifdef SE_X86
  static const bool ok = se_cpu::has_avx512_bf16() && __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

struct Tiles {
  template <int R, int C>
  static TileFn pick() {
#ifdef SE_X86
    if (has_avx512_vnni()) return &tile_avx512<R, C>;
#endif
    return &tile_portable<R, C>;
  }
};

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// Checks the packed weight (codes and scale_zero, csrc layout) of in_features inputs; returns its groups G.
int64_t check_packed(const at::Tensor& codes, const at::Tensor& scale_zero, int64_t in_features) {
  check_cpu(codes, "codes", at::kByte);
  check_cpu(scale_zero, "scale_zero", at::kBFloat16);
  TORCH_CHECK_VALUE(in_features > 0 && in_features % GROUP == 0, "the inputs must be a positive multiple of ",
                    GROUP, ", got ", in_features);
  const int64_t blocks = (in_features + BLOCK - 1) / BLOCK, G = 4 * blocks;
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(1) == blocks * BLOCK_BYTES, "codes must be [N, ",
                    blocks * BLOCK_BYTES, "] for ", in_features, " inputs, got shape ", codes.sizes());
  const int64_t N = codes.size(0);
  TORCH_CHECK_VALUE(scale_zero.dim() == 3 && scale_zero.size(0) == N && scale_zero.size(1) == 2 &&
                        scale_zero.size(2) == G,
                    "scale_zero must be [", N, ", 2, ", G, "], got shape ", scale_zero.sizes());
  return G;
}

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scale_zero_in,
                       const std::optional<at::Tensor>& bias) {
  check_cpu(x_in, "x", at::kBFloat16);
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "x must be [..., K], got a scalar");
  const int64_t in_features = x_in.size(-1), G = check_packed(codes_in, scale_zero_in, in_features);
  const int64_t N = codes_in.size(0);
  at::Tensor b;
  if (bias.has_value()) {
    check_cpu(*bias, "bias", at::kBFloat16);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ", bias->sizes());
    b = bias->contiguous();
  }
  const at::Tensor x = x_in.reshape({-1, in_features}).contiguous();
  const at::Tensor codes = codes_in.contiguous(), scale_zero = scale_zero_in.contiguous();
  const int64_t M = x.size(0);
  const QuantizedRows rows(x.data_ptr<bf16>(), M, in_features, G);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const bf16* szp = scale_zero.data_ptr<bf16>();
  const bf16* bp = b.defined() ? b.data_ptr<bf16>() : nullptr;
  bf16* yp = y.data_ptr<bf16>();
  const auto& table = se_cpu::tiles<Tiles, ROW_TILE, COL_TILE>();
  const int64_t col_tiles = (N + COL_TILE - 1) / COL_TILE;
  at::parallel_for(0, col_tiles, se_cpu::grain(M * COL_TILE * G * GROUP), [&](int64_t t0, int64_t t1) {
    for (int64_t m = 0; m < M; m += ROW_TILE) {
      const int64_t r = std::min<int64_t>(ROW_TILE, M - m);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * COL_TILE, cols = std::min<int64_t>(COL_TILE, N - n0);
        table[r - 1][cols - 1](rows, m, cp + n0 * (G * GROUP / 2), szp + n0 * 2 * G, bp ? bp + n0 : nullptr,
                               yp + m * N + n0, N);
      }
    }
  });
  return y.view(out_shape);
}

// One output's weights w[k] = bf16((q_k - 8) s_g + z_g), k < in_features, from its packed row.
void dequantize_row_portable(const uint8_t* row, const bf16* s, int64_t G, int64_t in_features, bf16* w) {
  for (int64_t k = 0; k < in_features; ++k) {
    const int64_t g = k / GROUP;
    const float q = static_cast<float>(code_at(row, k) - 8);
    w[k] = bf16(std::fma(q, static_cast<float>(s[g]), static_cast<float>(s[G + g])));
  }
}

#ifdef SE_X86
SE_AVX512 void dequantize_row_avx512(const uint8_t* row, const bf16* s, int64_t G, int64_t in_features, bf16* w) {
  const __m512i eight = _mm512_set1_epi32(8);
  for (int64_t k = 0; k < in_features; k += 16) {  // 16 inputs of one group
    const int64_t g = k / GROUP, j = k % BLOCK;
    const uint8_t* p = row + k / BLOCK * BLOCK_BYTES + j % BLOCK_BYTES;
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i codes = _mm_and_si128(j < BLOCK_BYTES ? bytes : _mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(codes), eight));
    const __m512 wk =
        _mm512_fmadd_ps(q, _mm512_set1_ps(static_cast<float>(s[g])), _mm512_set1_ps(static_cast<float>(s[G + g])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + k), (__m256i)_mm512_cvtneps_pbh(wk));
  }
}
#endif

// W [N, in_features] in bf16, (q - 8) s + z in fp32 rounded once: the weight for a plain matmul over many rows.
at::Tensor int4_dequantize(const at::Tensor& codes_in, const at::Tensor& scale_zero_in, int64_t in_features) {
  const int64_t G = check_packed(codes_in, scale_zero_in, in_features), N = codes_in.size(0), blocks = G / 4;
  const at::Tensor codes = codes_in.contiguous(), scale_zero = scale_zero_in.contiguous();
  at::Tensor w = at::empty({N, in_features}, scale_zero.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const bf16* szp = scale_zero.data_ptr<bf16>();
  bf16* wp = w.data_ptr<bf16>();
#ifdef SE_X86
  const auto row = has_avx512_vnni() ? &dequantize_row_avx512 : &dequantize_row_portable;
#else
  const auto row = &dequantize_row_portable;
#endif
  at::parallel_for(0, N, se_cpu::grain(in_features), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      row(cp + n * blocks * BLOCK_BYTES, szp + n * 2 * G, G, in_features, wp + n * in_features);
  });
  return w;
}

}  // namespace

TORCH_LIBRARY(se_q, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale_zero, Tensor? bias) -> Tensor");
  m.def("int4_dequantize(Tensor codes, Tensor scale_zero, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(se_q, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_dequantize", &int4_dequantize);
}

}  // namespace se_q
