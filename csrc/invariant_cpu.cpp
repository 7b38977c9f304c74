// torch ops se_inv::linear and se_inv::attention: batch-invariant bf16 CPU kernels.
//
// Batch-invariant: every output element is computed by one thread with one fixed sequence of
// instructions that depends only on that element's own inputs (its row of x and the weights; its
// query and its keys 0 .. position), never on how many other rows, queries, padded keys or threads
// the call has. So a token's result is bitwise the same in a 1-token decode, a k + 1-token verify,
// a prefill, or beside other sequences. oneDNN's bf16 GEMM and PyTorch's CPU SDPA both change their
// reduction order with the row count / key count (see se_engine/invariant_ops.py).
//
// linear:    y[m, n] = round_bf16(sum_k x[m, k] w[n, k] + b[n]), the sum in fp32: 16 lanes, lane i
//            accumulating elements 32j + 2i, 32j + 2i + 1 of each 32-wide block j in order (AVX512-BF16
//            vdpbf16ps), then one fixed horizontal tree (reduce16).
// attention: out[t, h] = sum_{f_t <= j <= p_t} softmax_j(s_j) v_j over slot s_t's cache, s_j = q_t,h . k_j / sqrt(D)
//            (soft-capped to cap tanh(s_j / cap) where softcap = cap > 0), f_t = max(0, p_t - window + 1)
//            (window 0: f_t = 0): scores in fp32 (one fixed tree per key), exp by one fixed polynomial, the
//            weights rounded to bf16 for the value products (fp32 sums over key pairs in order from f_t).
// Machines without AVX512-BF16 run portable loops with the same structure (invariant as well, but
// rounding differently from the AVX512 path).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_features.h"

namespace se_inv {
namespace {

using bf16 = c10::BFloat16;

constexpr int64_t LANES = 16;     // fp32 lanes of one accumulator
constexpr int64_t KBLOCK = 32;    // bf16 elements per accumulation step
constexpr int64_t ROW_TILE = 6;   // rows of x per register tile (24 accumulators: 10 loads per 24 dot steps)
constexpr int64_t COL_TILE = 4;   // rows of w (outputs) per register tile
constexpr int64_t L2_BYTES = 768 * 1024;  // one block of x rows, kept in L2 (1 MiB here) while the weights stream past
constexpr int64_t K_CHUNK = 2048;         // a 4-row weight tile of one K chunk (16 KiB) stays in L1

using se_cpu::grain;
using se_cpu::has_avx512_bf16;

inline float bf16_to_float(const bf16* p) { return static_cast<float>(*p); }

// ------------------------------------------------------------------------------------------ linear

// Portable twin of the register tile below: R x C dot products with the same lane structure over the
// whole of K (it takes the first chunk's call and skips the others); writes
// y[r * ldy + c] = bf16(x[r, :] . w[c, :] + bias[c]) (bias null: + 0).
template <int R, int C>
void tile_portable(const bf16* x, int64_t ldx, const bf16* w, int64_t ldw, int64_t K, int64_t k0, int64_t,
                   float*, const bf16* bias, bf16* y, int64_t ldy) {
  if (k0 != 0) return;
  float acc[R][C][LANES] = {};
  for (int64_t k0 = 0; k0 < K; k0 += KBLOCK) {
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) {
        for (int64_t i = 0; i < LANES; ++i) {
          const int64_t k = k0 + 2 * i;
          float s = 0.f;
          if (k < K) s += bf16_to_float(x + r * ldx + k) * bf16_to_float(w + c * ldw + k);
          if (k + 1 < K) s += bf16_to_float(x + r * ldx + k + 1) * bf16_to_float(w + c * ldw + k + 1);
          acc[r][c][i] += s;
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float lanes[LANES];
      std::memcpy(lanes, acc[r][c], sizeof(lanes));
      for (int64_t width = LANES / 2; width >= 1; width /= 2) {
        for (int64_t i = 0; i < width; ++i) lanes[i] += lanes[i + width];
      }
      y[r * ldy + c] = bf16(lanes[0] + (bias ? static_cast<float>(bias[c]) : 0.f));
    }
  }
}

#ifdef SE_X86
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline __m512bh load_bf16(const bf16* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// The lane sums of 16 accumulators at once: out[j] = sum of a[j]'s 16 lanes, by the same tree for
// every j ((e0 + e2) + (e1 + e3) within each 128-bit lane L, then (L0 + L1) + (L2 + L3)), so a sum
// does not depend on which of the 16 places it takes; vectors of unused places never mix with it.
__attribute__((target("avx512f"))) inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k)
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * k]), _mm512_castps_pd(b[2 * k + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * k]), _mm512_castps_pd(b[2 * k + 1]));
    c[k] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int k = 0; k < 2; ++k)
    d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x88), _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

// One 32-wide step of an R x C tile: acc[r][c] += x[r, k0 : k0 + 32] . w[c, k0 : k0 + 32] by lane pairs.
// FULL: a whole block (plain loads, and a prefetch of the weights PREFETCH elements ahead, since the
// weights stream from memory while x stays in cache); else the masked tail of K. Past a row's end
// the prefetch goes on in the next tile's rows (w is [N, ldw]), so each of the C streams is read
// ahead without a gap across tiles. Into L2 (T1): 8 KiB ahead per stream covers the memory latency,
// and lines that early in L1 would evict the x rows and weights the tile still reads.
constexpr int64_t PREFETCH = 4096;

template <int R, int C, bool FULL>
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) inline void tile_step(
    __m512 (&acc)[R][C], const bf16* x, int64_t ldx, const bf16* w, int64_t ldw, int64_t k0, __mmask32 mask) {
  __m512bh wv[C];
  const int64_t ahead = k0 + PREFETCH < ldw ? k0 + PREFETCH : k0 + PREFETCH + (COL_TILE - 1) * ldw;
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) {
    if constexpr (FULL) {
      wv[c] = (__m512bh)_mm512_loadu_si512(w + c * ldw + k0);
      _mm_prefetch(reinterpret_cast<const char*>(w + c * ldw + ahead), _MM_HINT_T1);
    } else {
      wv[c] = load_bf16(w + c * ldw + k0, mask);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512bh xv = FULL ? (__m512bh)_mm512_loadu_si512(x + r * ldx + k0) : load_bf16(x + r * ldx + k0, mask);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
  }
}

// An R x C tile over k in [k0, k1): acc[r][c] += x[r, k0:k1] . w[c, k0:k1] by 32-wide steps. The
// accumulators start from zero (k0 == 0) or from ``spill`` (a previous chunk of K), and go back to
// ``spill`` unless k1 == K, where y[r * ldy + c] = bf16(acc's lane sum + bias[c]) (RNE; bias null: + 0).
// Chunking K keeps a weight tile in L1 across the row tiles of a block; since the accumulators are stored and
// reloaded exactly, every output's sequence of operations is the same for any chunking.
template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void tile_avx512(const bf16* x, int64_t ldx, const bf16* w, int64_t ldw, int64_t K, int64_t k0, int64_t k1,
                 float* spill, const bf16* bias, bf16* y, int64_t ldy) {
  // Fully unrolled so that the R x C accumulators live in registers.
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(spill + LANES * (r * COL_TILE + c));
  const int64_t full = std::min(k1, K / KBLOCK * KBLOCK);
  for (int64_t k = k0; k < full; k += KBLOCK) tile_step<R, C, true>(acc, x, ldx, w, ldw, k, 0);
  if (full < k1) tile_step<R, C, false>(acc, x, ldx, w, ldw, full, (__mmask32(1) << (K - full)) - 1);
  if (k1 < K) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(spill + LANES * (r * COL_TILE + c), acc[r][c]);
    return;
  }
  // Place p = r * COL_TILE + c; 16 places per reduce16, whose 16 sums take the biases c = p % 4.
  constexpr int PLACES = R * COL_TILE, GROUPS = (PLACES + 15) / 16;  // R <= 4 rows: one reduce16, not two
  __m512 all[GROUPS * 16];
#pragma GCC unroll 32
  for (int i = 0; i < GROUPS * 16; ++i)
    all[i] = i / COL_TILE < R && i % COL_TILE < C ? acc[i / COL_TILE][i % COL_TILE] : _mm512_setzero_ps();
  float b[COL_TILE] = {};
  for (int c = 0; c < C && bias; ++c) b[c] = static_cast<float>(bias[c]);
  const __m512 biases = _mm512_broadcast_f32x4(_mm_loadu_ps(b));
  bf16 rounded[GROUPS * 16];
#pragma GCC unroll 2
  for (int g = 0; g < GROUPS; ++g)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + 16 * g),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(reduce16(all + 16 * g), biases)));
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) std::memcpy(y + r * ldy, rounded + r * COL_TILE, C * sizeof(bf16));
}
#endif

using TileFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, int64_t, int64_t, int64_t, float*, const bf16*,
                        bf16*, int64_t);

// Tails of M and N take smaller tiles with the same per-element order.
struct Tiles {
  template <int R, int C>
  static TileFn pick() {
#ifdef SE_X86
    if (has_avx512_bf16()) return &tile_avx512<R, C>;
#endif
    return &tile_portable<R, C>;
  }
};

void check_bf16_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ", t.scalar_type());
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias) {
  check_bf16_matrix(x_in, "x");
  check_bf16_matrix(w_in, "weight");
  TORCH_CHECK_VALUE(w_in.dim() == 2, "weight must be [N, K], got shape ", w_in.sizes());
  const int64_t K = w_in.size(1), N = w_in.size(0);
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.size(-1) == K, "x must be [..., ", K, "], got shape ", x_in.sizes());
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const at::Tensor w = w_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor b;
  if (bias.has_value()) {
    check_bf16_matrix(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ", bias->sizes());
    b = bias->contiguous();
  }
  const bf16* bp = b.defined() ? b.data_ptr<bf16>() : nullptr;
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  // Rows of x per block: a block stays in cache while every output tile of a thread streams past it.
  const int64_t row_block = std::max<int64_t>(ROW_TILE, (L2_BYTES / (K * 2)) / ROW_TILE * ROW_TILE);
  // Accumulators of every row tile of a block between K chunks (none when K is one chunk).
  const int64_t spill_size = K > K_CHUNK ? (std::min(row_block, M) + ROW_TILE) * COL_TILE * LANES : 0;
  const int64_t col_tiles = (N + COL_TILE - 1) / COL_TILE;
  const auto& table = se_cpu::tiles<Tiles, ROW_TILE, COL_TILE>();
  // Threads split the outputs, never a sum: each output's order is the same for any thread count.
  at::parallel_for(0, col_tiles, grain(M * COL_TILE * K), [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float[]> spill(new float[spill_size]);  // not zeroed: a tile starts from 0 at k0 == 0
    for (int64_t m0 = 0; m0 < M; m0 += row_block) {
      const int64_t m1 = std::min(M, m0 + row_block);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * COL_TILE, cols = std::min<int64_t>(COL_TILE, N - n0);
        for (int64_t k0 = 0; k0 < K; k0 += K_CHUNK) {
          for (int64_t m = m0; m < m1; m += ROW_TILE) {
            const int64_t rows = std::min<int64_t>(ROW_TILE, m1 - m);
            table[rows - 1][cols - 1](xp + m * K, K, wp + n0 * K, K, K, k0, std::min(K, k0 + K_CHUNK),
                                      spill.get() + (m - m0) * COL_TILE * LANES, bp ? bp + n0 : nullptr,
                                      yp + m * N + n0, N);
          }
        }
      }
    }
  });
  return y.view(out_shape);
}

// --------------------------------------------------------------------------------------- attention

// Gemma 2's soft-capping, s -> cap tanh(s / cap), one score at a time (cap 0: none); both paths share it.
inline void cap_scores(float* scores, int64_t n, float cap) {
  if (cap == 0.f) return;
  for (int64_t j = 0; j < n; ++j) scores[j] = cap * std::tanh(scores[j] / cap);
}

#ifdef SE_X86
// exp(x) for x <= 0 (softmax terms): x = n ln2 + r, |r| <= ln2 / 2, a degree-6 Taylor polynomial in r.
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// q . key by 32-wide steps in order (the lanes of one score's sum).
template <int BLOCKS>
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) inline __m512 key_dot(
    const __m512bh (&qv)[BLOCKS], const __mmask32 (&masks)[BLOCKS], const bf16* key) {
  __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int b = 0; b < BLOCKS; ++b) acc = _mm512_dpbf16_ps(acc, qv[b], load_bf16(key + b * KBLOCK, masks[b]));
  return acc;
}

// BLOCKS = ceil(D / 32) <= 8 at compile time, so that q, the 16 keys' sums and the value sums live in
// registers.
template <int BLOCKS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void attend_avx512(const bf16* q, const bf16* keys, const bf16* values, int64_t n_keys, int64_t D, float scale,
                   float softcap, float* scores, bf16* weights, bf16* out) {
  __mmask32 masks[BLOCKS];
  __m512bh qv[BLOCKS];
#pragma GCC unroll 8
  for (int b = 0; b < BLOCKS; ++b) {
    const int64_t left = D - b * KBLOCK;
    masks[b] = left >= KBLOCK ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
    qv[b] = load_bf16(q + b * KBLOCK, masks[b]);
  }
  for (int64_t j0 = 0; j0 < n_keys; j0 += LANES) {  // 16 keys' dot products, summed together
    const int64_t count = std::min<int64_t>(LANES, n_keys - j0);
    __m512 acc[LANES];
    if (count == LANES) {
#pragma GCC unroll 16
      for (int i = 0; i < LANES; ++i) acc[i] = key_dot<BLOCKS>(qv, masks, keys + (j0 + i) * D);
    } else {
      for (int i = 0; i < LANES; ++i)
        acc[i] = i < count ? key_dot<BLOCKS>(qv, masks, keys + (j0 + i) * D) : _mm512_setzero_ps();
    }
    const __mmask16 mask = count == LANES ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    _mm512_mask_storeu_ps(scores + j0, mask, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
  }
  cap_scores(scores, n_keys, softcap);
  __m512 tops = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n_keys; j += LANES) {
    const __mmask16 mask = n_keys - j >= LANES ? __mmask16(0xFFFF) : __mmask16((1u << (n_keys - j)) - 1);
    tops = _mm512_mask_max_ps(tops, mask, tops, _mm512_maskz_loadu_ps(mask, scores + j));
  }
  const float top = _mm512_reduce_max_ps(tops);
  // Weights e_j = exp(s_j - top), rounded to bf16 (as the value products below take them) into
  // `weights` (and a zero after them), summed.
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_keys; j += LANES) {
    const __mmask16 mask = n_keys - j >= LANES ? __mmask16(0xFFFF) : __mmask16((1u << (n_keys - j)) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(mask, scores + j);
    const __m256bh rounded = _mm512_cvtneps_pbh(exp_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(top))));
    _mm256_mask_storeu_epi16(weights + j, mask, (__m256i)rounded);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, _mm512_cvtpbh_ps(rounded)));
  }
  weights[n_keys] = bf16(0.f);
  const float inv = 1.0f / _mm512_reduce_add_ps(total);
  // out = sum_j e_j v_j over key pairs (j, j + 1) in order, by bf16 dot products: interleaving the two
  // value rows (unpacklo / unpackhi) puts (v_j[d], v_j+1[d]) in one lane; lane 4l + i of lo / hi of
  // 32-wide block b holds dimension 32b + 8l + i / 32b + 8l + 4 + i. An odd count's last key pairs
  // with a zero row and weight.
  __m512 lo[BLOCKS], hi[BLOCKS];
#pragma GCC unroll 8
  for (int b = 0; b < BLOCKS; ++b) lo[b] = hi[b] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_keys; j += 2) {
    const bool pair = j + 1 < n_keys;
    int32_t both;
    std::memcpy(&both, weights + j, sizeof(both));
    const __m512bh w = (__m512bh)_mm512_set1_epi32(both);
#pragma GCC unroll 8
    for (int b = 0; b < BLOCKS; ++b) {
      const __m512i first = _mm512_maskz_loadu_epi16(masks[b], values + j * D + b * KBLOCK);
      const __m512i second = _mm512_maskz_loadu_epi16(pair ? masks[b] : 0, values + (j + 1) * D + b * KBLOCK);
      lo[b] = _mm512_dpbf16_ps(lo[b], (__m512bh)_mm512_unpacklo_epi16(first, second), w);
      hi[b] = _mm512_dpbf16_ps(hi[b], (__m512bh)_mm512_unpackhi_epi16(first, second), w);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < BLOCKS; ++b) {
    float l[LANES], h[LANES];
    _mm512_storeu_ps(l, _mm512_mul_ps(lo[b], _mm512_set1_ps(inv)));
    _mm512_storeu_ps(h, _mm512_mul_ps(hi[b], _mm512_set1_ps(inv)));
    for (int64_t lane = 0; lane < 4; ++lane) {
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t d = b * KBLOCK + 8 * lane + i;
        if (d < D) out[d] = bf16(l[4 * lane + i]);
        if (d + 4 < D) out[d + 4] = bf16(h[4 * lane + i]);
      }
    }
  }
}
#endif

void attend_portable(const bf16* q, const bf16* keys, const bf16* values, int64_t n_keys, int64_t D, float scale,
                     float softcap, float* scores, bf16*, bf16* out) {
  for (int64_t j = 0; j < n_keys; ++j) {
    float lanes[LANES] = {};
    for (int64_t d = 0; d < D; ++d) lanes[(d % KBLOCK) / 2] += bf16_to_float(q + d) * bf16_to_float(keys + j * D + d);
    for (int64_t width = LANES / 2; width >= 1; width /= 2)
      for (int64_t i = 0; i < width; ++i) lanes[i] += lanes[i + width];
    scores[j] = lanes[0] * scale;
  }
  cap_scores(scores, n_keys, softcap);
  float top = -INFINITY;
  for (int64_t j = 0; j < n_keys; ++j) top = std::max(top, scores[j]);
  float total = 0.f;
  for (int64_t j = 0; j < n_keys; ++j) total += (scores[j] = static_cast<float>(bf16(std::exp(scores[j] - top))));
  std::vector<float> acc(D, 0.f);
  for (int64_t j = 0; j < n_keys; ++j)
    for (int64_t d = 0; d < D; ++d) acc[d] += scores[j] * bf16_to_float(values + j * D + d);
  for (int64_t d = 0; d < D; ++d) out[d] = bf16(acc[d] / total);
}

// Both take scratch for n_keys scores and n_keys + 1 bf16 weights.
using AttendFn = void (*)(const bf16*, const bf16*, const bf16*, int64_t, int64_t, float, float, float*, bf16*, bf16*);

AttendFn attend_fn(int64_t D) {
#ifdef SE_X86
  if (has_avx512_bf16()) {
    static const AttendFn by_blocks[8] = {&attend_avx512<1>, &attend_avx512<2>, &attend_avx512<3>, &attend_avx512<4>,
                                          &attend_avx512<5>, &attend_avx512<6>, &attend_avx512<7>, &attend_avx512<8>};
    return by_blocks[(D + KBLOCK - 1) / KBLOCK - 1];
  }
#endif
  return &attend_portable;
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& slots_in, const at::Tensor& positions_in, int64_t window, double softcap) {
  TORCH_CHECK_VALUE(window >= 0, "window must be >= 0 (0: none), got ", window);
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap), "softcap must be finite and >= 0 (0: none), got ", softcap);
  const float cap = static_cast<float>(softcap);
  check_bf16_matrix(q_in, "q");
  check_bf16_matrix(k_cache, "k_cache");
  check_bf16_matrix(v_cache, "v_cache");
  TORCH_CHECK_VALUE(q_in.dim() == 3, "q must be [N, Hq, D], got shape ", q_in.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
                    "k_cache and v_cache must be one layer's [B, Hkv, S, D], got ", k_cache.sizes(), " and ",
                    v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  const int64_t N = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D && D >= 1 && D <= 256, "head dim ", D, " must match the cache's ",
                    k_cache.size(3), " and be 1 .. 256");
  TORCH_CHECK_VALUE(Hq % Hkv == 0, Hq, " query heads are not a multiple of ", Hkv, " kv heads");
  for (const at::Tensor* t : {&slots_in, &positions_in}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong && t->device().is_cpu() && t->dim() == 1 && t->size(0) == N,
                     "slots and positions must be [", N, "] int64 CPU tensors");
  }
  const at::Tensor q = q_in.contiguous(), slots = slots_in.contiguous(), positions = positions_in.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < N; ++t) {
    TORCH_CHECK_INDEX(0 <= sp[t] && sp[t] < B && 0 <= pp[t] && pp[t] < S, "token ", t, ": slot ", sp[t],
                      " / position ", pp[t], " out of range for ", B, " slots of ", S, " positions");
  }
  at::Tensor out = at::empty({N, Hq, D}, q.options());
  const bf16* qp = q.data_ptr<bf16>();
  const bf16* kp = k_cache.data_ptr<bf16>();
  const bf16* vp = v_cache.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t group = Hq / Hkv;
  const AttendFn attend = attend_fn(D);
  int64_t keys = 0;  // over all queries: a (query, head) item costs 2 D multiply-adds per key
  for (int64_t t = 0; t < N; ++t) keys += window > 0 ? std::min<int64_t>(pp[t] + 1, window) : pp[t] + 1;
  at::parallel_for(0, N * Hq, grain(2 * D * keys / std::max<int64_t>(N, 1)), [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(S);
    std::vector<bf16> weights(S + 1);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / Hq, h = i % Hq;
      const int64_t first = window > 0 ? std::max<int64_t>(0, pp[t] - window + 1) : 0;
      const int64_t cache_at = ((sp[t] * Hkv + h / group) * S + first) * D, n_keys = pp[t] + 1 - first;
      attend(qp + i * D, kp + cache_at, vp + cache_at, n_keys, D, scale, cap, scores.data(), weights.data(),
             op + i * D);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------ rms_norm, rope

// y = w * bf16(x * r) (Llama) or bf16(x * r * (1 + w)) (Gemma), r = 1 / sqrt(mean(x^2) + eps), per row
// in fp32, the sum of squares in index order: one op for what is eight in PyTorch.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps, bool gemma) {
  check_bf16_matrix(x_in, "x");
  check_bf16_matrix(weight_in, "weight");
  const int64_t D = weight_in.numel();
  TORCH_CHECK_VALUE(weight_in.dim() == 1 && x_in.dim() >= 1 && x_in.size(-1) == D, "x must be [..., ", D,
                    "] for a weight of shape ", weight_in.sizes(), ", got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  const float epsf = static_cast<float>(eps);
  // One row per task: a row costs a few microseconds (its sum of squares is one serial chain).
  at::parallel_for(0, x.numel() / std::max<int64_t>(D, 1), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* xr = xp + r * D;
      float squares = 0.f;
      for (int64_t d = 0; d < D; ++d) squares += static_cast<float>(xr[d]) * static_cast<float>(xr[d]);
      const float inv = 1.0f / std::sqrt(squares / static_cast<float>(D) + epsf);
      for (int64_t d = 0; d < D; ++d) {
        const float normed = static_cast<float>(xr[d]) * inv;
        yp[r * D + d] = gemma ? bf16(normed * (1.0f + static_cast<float>(wp[d])))
                              : bf16(static_cast<float>(wp[d]) * static_cast<float>(bf16(normed)));
      }
    }
  });
  return y;
}

// Rotate-half RoPE over a head's first R = cos.size(-1) dims (R < D: partial rotary; the rest pass through):
// out[n, h, d] = bf16(x[d] cos[n, d] + rot[d] sin[n, d]), rot = (-x[R/2:R], x[:R/2]), in fp32 with each
// product and the sum rounded (no fused multiply-add): bitwise PyTorch's apply_rope.
__attribute__((optimize("fp-contract=off")))
at::Tensor rope(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_bf16_matrix(x_in, "x");
  TORCH_CHECK_VALUE(x_in.dim() == 3, "x must be [N, H, D], got ", x_in.sizes());
  const int64_t N = x_in.size(0), H = x_in.size(1), D = x_in.size(2), R = cos_in.size(-1), half = R / 2;
  TORCH_CHECK_VALUE(R % 2 == 0 && R <= D, "cos and sin must rotate an even number of dims <= ", D, ", got ", R);
  for (const at::Tensor* t : {&cos_in, &sin_in}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat && t->device().is_cpu(), "cos and sin must be float32 CPU tensors");
    TORCH_CHECK_VALUE(t->numel() == N * R && t->size(-1) == R, "cos and sin must hold [N, ", R, "] = [", N, ", ",
                      R, "], got ", t->sizes());
  }
  const at::Tensor x = x_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const bf16* xp = x.data_ptr<bf16>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, N * H, grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const bf16* xi = xp + i * D;
      const float* c = cp + (i / H) * R;
      const float* s = sp + (i / H) * R;
      for (int64_t d = 0; d < R; ++d) {
        const float rot = d < half ? -static_cast<float>(xi[d + half]) : static_cast<float>(xi[d - half]);
        const float a = static_cast<float>(xi[d]) * c[d];
        const float b = rot * s[d];
        op[i * D + d] = bf16(a + b);
      }
      for (int64_t d = R; d < D; ++d) op[i * D + d] = xi[d];
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------ gated

// The gated MLP's middle: y[m, i] = bf16(bf16(act(g)) * u), g = x[m, i], u = x[m, I + i], in fp32 (the
// activation rounded before the product, as transformers' act(gate) * up in bf16): silu(g) =
// g sigmoid(g), gelu_tanh(g) = g / 2 (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))); sigmoid and tanh
// from e = exp(-|.|), so that exp's argument is never positive.
enum class Activation { silu, gelu_tanh };

inline float activate_portable(float g, Activation act) {
  if (act == Activation::silu) {
    const float e = std::exp(-std::fabs(g));
    return g * (g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
  }
  const float y = 0.7978845608028654f * (g + 0.044715f * g * g * g), e = std::exp(-2.f * std::fabs(y));
  return 0.5f * g * (1.f + std::copysign((1.f - e) / (1.f + e), y));
}

#ifdef SE_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void gated_avx512(const bf16* gate, const bf16* up, int64_t n, Activation act, bf16* out) {
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += LANES) {
    const __mmask16 mask = n - i >= LANES ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 g = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask, gate + i));
    const __m512 u = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask, up + i));
    __m512 a;
    if (act == Activation::silu) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(zero, _mm512_abs_ps(g)));
      const __mmask16 positive = _mm512_cmp_ps_mask(g, zero, _CMP_GE_OQ);
      a = _mm512_mul_ps(g, _mm512_div_ps(_mm512_mask_blend_ps(positive, e, one), _mm512_add_ps(one, e)));
    } else {
      const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g), g), g);
      const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_add_ps(g, cube));
      const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(y)));
      const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
      const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(INT32_MIN));
      const __m512 signed_t = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));  // copysign
      a = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, signed_t));
    }
    const __m512 rounded = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(a));
    _mm256_mask_storeu_epi16(out + i, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(rounded, u)));
  }
}
#endif

__attribute__((optimize("fp-contract=off")))  // the same roundings as the AVX512 loop's separate ops
void gated_portable(const bf16* gate, const bf16* up, int64_t n, Activation act, bf16* out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = bf16(static_cast<float>(bf16(activate_portable(static_cast<float>(gate[i]), act))) *
                  static_cast<float>(up[i]));
}

at::Tensor gated(const at::Tensor& x_in, c10::string_view activation) {
  check_bf16_matrix(x_in, "x");
  TORCH_CHECK_VALUE(activation == "silu" || activation == "gelu_pytorch_tanh",
                    "activation must be silu or gelu_pytorch_tanh, got ", activation);
  const Activation act = activation == "silu" ? Activation::silu : Activation::gelu_tanh;
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.size(-1) % 2 == 0, "x must be [..., 2 I] (gate | up), got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t I = x.size(-1) / 2, M = x.numel() / std::max<int64_t>(2 * I, 1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
#ifdef SE_X86
  const auto row = has_avx512_bf16() ? &gated_avx512 : &gated_portable;
#else
  const auto row = &gated_portable;
#endif
  at::parallel_for(0, M, grain(I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(xp + r * 2 * I, xp + r * 2 * I + I, I, act, yp + r * I);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(se_inv, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions, int window=0, "
        "float softcap=0.0) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool gemma) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("gated(Tensor x, str activation) -> Tensor");
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16);
}

TORCH_LIBRARY_IMPL(se_inv, CPU, m) {
  m.impl("linear", &linear);
  m.impl("attention", &attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("gated", &gated);
}

}  // namespace se_inv
