// Tiled attention with decomposed relative positions (see relpos_attention.h).
//
// Why a kernel of our own: ONNX Runtime's CPU flash attention takes no additive bias, so the
// exported graphs fold rel_h/rel_w into one-hot q/k columns (192 instead of 64 dims per head:
// 3x the q.k arithmetic); given a materialised bias it falls back to building [heads, S, S]
// scores in memory. Here each work item is one head and a tile of queries: its score rows
// (kTileRows x S floats, 768 KB at S = 4096) stay in L2 between the passes, and the relative
// terms are added per key row/column as the scores are finished.
#include "relpos_attention.h"

#if defined(__x86_64__)
#define CELLSAM_X86 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace cellsam {
namespace {

constexpr int64_t kTileRows = 48;  // queries per work item (a multiple of both microkernels' rows)
constexpr int64_t kPanel = 32;     // keys per packed K^T panel (two AVX-512 vectors)
constexpr int64_t kKeyBlock = 128; // keys per pass of the P.V product (a 32 KB V block: L1)

struct Problem {
  AttentionShape shape;
  const float *q, *k, *v, *rel_h, *rel_w;
  float* out;
  float* kt;  // K^T packed per (batch, head) into panels: [panel][d][kPanel], zero padded
  float* vp;  // V packed per (batch, head): [S][d], so the P.V product streams it in order
  int64_t panels, tiles;
  Isa isa;
};

// Per-thread scratch, grown once: score rows, the query tile and the output accumulators.
struct Scratch {
  std::vector<float> scores, qtile, acc;
};
thread_local Scratch tls_scratch;

inline const float* row_of(const float* x, const AttentionShape& s, int64_t b, int64_t i,
                           int64_t n) {
  return x + ((b * s.seq() + i) * s.heads + n) * s.head_dim;
}

void pack_keys_values(void* data, size_t item) {
  auto& p = *static_cast<Problem*>(data);
  const auto& s = p.shape;
  const int64_t b = item / s.heads, n = item % s.heads, d_n = s.head_dim, seq = s.seq();
  float* dst = p.kt + item * p.panels * d_n * kPanel;
  for (int64_t pi = 0; pi < p.panels; ++pi) {
    float* panel = dst + pi * d_n * kPanel;
    for (int64_t c = 0; c < kPanel; ++c) {
      const int64_t j = pi * kPanel + c;
      if (j < seq) {
        const float* key = row_of(p.k, s, b, j, n);
        for (int64_t d = 0; d < d_n; ++d) panel[d * kPanel + c] = key[d];
      } else {
        for (int64_t d = 0; d < d_n; ++d) panel[d * kPanel + c] = 0.f;
      }
    }
  }
  float* v = p.vp + item * seq * d_n;
  for (int64_t j = 0; j < seq; ++j)
    std::memcpy(v + j * d_n, row_of(p.v, s, b, j, n), d_n * sizeof(float));
}

#ifdef CELLSAM_X86
// ---------------------------------------------------------------- AVX-512 path
#define AVX512 __attribute__((target("avx512f")))

// e^x for x <= 0 (scores minus their row maximum): Cody-Waite reduction to |f| <= ln2/2, a
// degree-7 Taylor polynomial (remainder < 3e-9 relative), then scale by 2^n.
AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 y = _mm512_set1_ps(1.f / 5040.f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 720.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 120.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 24.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 6.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

// lo/hi[r] = q[r, :] . K^T[:, panel keys 0-15 / 16-31] for R query rows and one 32-key panel.
template <int R>
AVX512 inline __attribute__((always_inline)) void qk_accumulate(const float* q, int64_t d_n,
                                                                const float* panel, __m512* lo,
                                                                __m512* hi) {
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < d_n; ++d) {
    const __m512 k0 = _mm512_loadu_ps(panel + d * kPanel);
    const __m512 k1 = _mm512_loadu_ps(panel + d * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * d_n + d]);
      lo[r] = _mm512_fmadd_ps(qb, k0, lo[r]);
      hi[r] = _mm512_fmadd_ps(qb, k1, hi[r]);
    }
  }
}

// scores[r, panel keys] = q[r, :] . K^T[:, panel keys] for R query rows and one 32-key panel.
template <int R>
AVX512 void qk_panel(const float* q, int64_t d_n, const float* panel, float* scores,
                     int64_t stride) {
  __m512 lo[R], hi[R];
  qk_accumulate<R>(q, d_n, panel, lo, hi);
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(scores + r * stride, lo[r]);
    _mm512_storeu_ps(scores + r * stride + 16, hi[r]);
  }
}

// acc[r, :] += sum_j p[r, j] v[j, :] over keys [j0, j1), R rows, V = 16 * DV wide.
template <int R, int DV>
AVX512 void pv_block(const float* p, int64_t p_stride, const float* v, int64_t v_stride,
                     int64_t j0, int64_t j1, float* acc) {
  __m512 a[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) a[r][c] = _mm512_loadu_ps(acc + r * 16 * DV + 16 * c);
  for (int64_t j = j0; j < j1; ++j) {
    const float* vj = v + j * v_stride;
    __m512 vv[DV];
    for (int c = 0; c < DV; ++c) vv[c] = _mm512_loadu_ps(vj + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * p_stride + j]);
      for (int c = 0; c < DV; ++c) a[r][c] = _mm512_fmadd_ps(pb, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(acc + r * 16 * DV + 16 * c, a[r][c]);
}

template <int DV>
AVX512 void pv_rows(int64_t rows, const float* p, int64_t p_stride, const float* v,
                    int64_t v_stride, int64_t seq, float* acc) {
  constexpr int R = DV <= 2 ? 8 : 6;  // accumulators + V vectors within 32 registers
  for (int64_t j0 = 0; j0 < seq; j0 += kKeyBlock) {
    const int64_t j1 = std::min(seq, j0 + kKeyBlock);
    int64_t r = 0;
    for (; r + R <= rows; r += R)
      pv_block<R, DV>(p + r * p_stride, p_stride, v, v_stride, j0, j1, acc + r * 16 * DV);
    for (; r < rows; ++r)
      pv_block<1, DV>(p + r * p_stride, p_stride, v, v_stride, j0, j1, acc + r * 16 * DV);
  }
}

// scores[r, panel keys] + rel_h[r, y] + rel_w[r, x0 : x0 + 32] for a panel inside one key row
// (W a multiple of 32), with each row's running maximum kept in vmax[r] (16 lanes).
template <int R>
AVX512 void qk_panel_relative(const float* q, int64_t d_n, const float* panel, float* scores,
                              int64_t stride, const float* rel_h, int64_t h_stride,
                              const float* rel_w, int64_t w_stride, float* vmax) {
  __m512 lo[R], hi[R];
  qk_accumulate<R>(q, d_n, panel, lo, hi);
  for (int r = 0; r < R; ++r) {
    const __m512 bh = _mm512_set1_ps(rel_h[r * h_stride]);
    const float* bw = rel_w + r * w_stride;
    lo[r] = _mm512_add_ps(_mm512_add_ps(lo[r], bh), _mm512_loadu_ps(bw));
    hi[r] = _mm512_add_ps(_mm512_add_ps(hi[r], bh), _mm512_loadu_ps(bw + 16));
    const __m512 m = _mm512_max_ps(_mm512_loadu_ps(vmax + 16 * r), _mm512_max_ps(lo[r], hi[r]));
    _mm512_storeu_ps(vmax + 16 * r, m);
    _mm512_storeu_ps(scores + r * stride, lo[r]);
    _mm512_storeu_ps(scores + r * stride + 16, hi[r]);
  }
}

// Adds the relative terms to one score row (any W); returns its maximum.
AVX512 float add_relative(float* row, const float* rel_h, const float* rel_w, int64_t height,
                          int64_t width) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t y = 0; y < height; ++y) {
    const __m512 bh = _mm512_set1_ps(rel_h[y]);
    float* s = row + y * width;
    for (int64_t x = 0; x < width; x += 16) {
      const __mmask16 m = width - x >= 16 ? 0xFFFF : (__mmask16)((1u << (width - x)) - 1);
      __m512 t = _mm512_maskz_loadu_ps(m, s + x);
      t = _mm512_add_ps(_mm512_add_ps(t, bh), _mm512_maskz_loadu_ps(m, rel_w + x));
      _mm512_mask_storeu_ps(s + x, m, t);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, t);
    }
  }
  return _mm512_reduce_max_ps(vmax);
}

// Turns a score row into e^(s - mx) in place; returns the sum.
AVX512 float exp_and_sum(float* row, int64_t seq, float row_max) {
  const __m512 mx = _mm512_set1_ps(row_max);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < seq; j += 16) {
    const __mmask16 m = seq - j >= 16 ? 0xFFFF : (__mmask16)((1u << (seq - j)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), mx));
    _mm512_mask_storeu_ps(row + j, m, e);
    vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
  }
  return _mm512_reduce_add_ps(vsum);
}

template <int R>
AVX512 void qk_rows(int64_t rows, const float* q, int64_t d_n, const float* panel, float* s,
                    int64_t stride) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) qk_panel<R>(q + r * d_n, d_n, panel, s + r * stride, stride);
  for (; r < rows; ++r) qk_panel<1>(q + r * d_n, d_n, panel, s + r * stride, stride);
}

AVX512 void tile_avx512(const Problem& p, int64_t b, int64_t n, int64_t i0, int64_t rows,
                        Scratch& t) {
  const auto& s = p.shape;
  const int64_t d_n = s.head_dim, seq = s.seq(), stride = p.panels * kPanel;
  const float* kt = p.kt + (b * s.heads + n) * p.panels * d_n * kPanel;
  float inv[kTileRows];
  const int64_t first = (b * seq + i0) * s.heads + n;  // (token, head) position of row 0
  if (s.width % kPanel == 0) {
    // Every panel lies in one key row: add the relative terms as the scores leave registers.
    alignas(64) float vmax[kTileRows * 16];
    std::fill(vmax, vmax + rows * 16, -INFINITY);
    const int64_t h_stride = s.heads * s.height, w_stride = s.heads * s.width;
    for (int64_t pi = 0; pi < p.panels; ++pi) {
      const int64_t y = pi * kPanel / s.width, x0 = pi * kPanel % s.width;
      const float* panel = kt + pi * d_n * kPanel;
      const float* rh = p.rel_h + first * s.height + y;
      const float* rw = p.rel_w + first * s.width + x0;
      float* sc = t.scores.data() + pi * kPanel;
      int64_t r = 0;
      for (; r + 8 <= rows; r += 8)
        qk_panel_relative<8>(t.qtile.data() + r * d_n, d_n, panel, sc + r * stride, stride,
                             rh + r * h_stride, h_stride, rw + r * w_stride, w_stride,
                             vmax + 16 * r);
      for (; r < rows; ++r)
        qk_panel_relative<1>(t.qtile.data() + r * d_n, d_n, panel, sc + r * stride, stride,
                             rh + r * h_stride, h_stride, rw + r * w_stride, w_stride,
                             vmax + 16 * r);
    }
    for (int64_t r = 0; r < rows; ++r)
      inv[r] = 1.f / exp_and_sum(t.scores.data() + r * stride, seq,
                                 _mm512_reduce_max_ps(_mm512_loadu_ps(vmax + 16 * r)));
  } else {
    for (int64_t pi = 0; pi < p.panels; ++pi)
      qk_rows<8>(rows, t.qtile.data(), d_n, kt + pi * d_n * kPanel,
                 t.scores.data() + pi * kPanel, stride);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = first + r * s.heads;
      float* row = t.scores.data() + r * stride;
      const float mx = add_relative(row, p.rel_h + pos * s.height, p.rel_w + pos * s.width,
                                    s.height, s.width);
      inv[r] = 1.f / exp_and_sum(row, seq, mx);
    }
  }
  std::fill(t.acc.begin(), t.acc.begin() + rows * d_n, 0.f);
  const float* v = p.vp + (b * s.heads + n) * seq * d_n;
  const int64_t v_stride = d_n;
  switch (d_n / 16) {
    case 1: pv_rows<1>(rows, t.scores.data(), stride, v, v_stride, seq, t.acc.data()); break;
    case 2: pv_rows<2>(rows, t.scores.data(), stride, v, v_stride, seq, t.acc.data()); break;
    case 3: pv_rows<3>(rows, t.scores.data(), stride, v, v_stride, seq, t.acc.data()); break;
    default: pv_rows<4>(rows, t.scores.data(), stride, v, v_stride, seq, t.acc.data()); break;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = p.out + ((b * seq + i0 + r) * s.heads + n) * d_n;
    for (int64_t d = 0; d < d_n; ++d) o[d] = t.acc[r * d_n + d] * inv[r];
  }
}

// ---------------------------------------------------------------- AVX2 + FMA path
// The same tiling with 8-wide vectors and 16 registers: 4 query rows x 16 keys per q.k step,
// 4 rows x 16 channels per P.V step.
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // keeps 2^n normal: n >= -126
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 y = _mm256_set1_ps(1.f / 5040.f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 720.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 120.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 24.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 6.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

AVX2 inline __m256i lanes_below(int64_t n) {  // all-ones in the first min(n, 8) lanes
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

AVX2 inline float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

// scores[r, 16 keys] for R rows from one half of a 32-key panel.
template <int R>
AVX2 void qk_half(const float* q, int64_t d_n, const float* panel, float* scores,
                  int64_t stride) {
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < d_n; ++d) {
    const __m256 k0 = _mm256_loadu_ps(panel + d * kPanel);
    const __m256 k1 = _mm256_loadu_ps(panel + d * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q + r * d_n + d);
      lo[r] = _mm256_fmadd_ps(qb, k0, lo[r]);
      hi[r] = _mm256_fmadd_ps(qb, k1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(scores + r * stride, lo[r]);
    _mm256_storeu_ps(scores + r * stride + 8, hi[r]);
  }
}

template <int R>
AVX2 void qk_rows_avx2(int64_t rows, const float* q, int64_t d_n, const float* panel, float* s,
                       int64_t stride) {
  for (int half = 0; half < 2; ++half) {
    int64_t r = 0;
    for (; r + R <= rows; r += R)
      qk_half<R>(q + r * d_n, d_n, panel + 16 * half, s + r * stride + 16 * half, stride);
    for (; r < rows; ++r)
      qk_half<1>(q + r * d_n, d_n, panel + 16 * half, s + r * stride + 16 * half, stride);
  }
}

// acc[r, c0:c0+16] += sum_j p[r, j] v[j, c0:c0+16] over keys [j0, j1), R rows.
template <int R>
AVX2 void pv_block_avx2(const float* p, int64_t p_stride, const float* v, int64_t v_stride,
                        int64_t j0, int64_t j1, float* acc, int64_t acc_stride) {
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm256_loadu_ps(acc + r * acc_stride);
    hi[r] = _mm256_loadu_ps(acc + r * acc_stride + 8);
  }
  for (int64_t j = j0; j < j1; ++j) {
    const __m256 v0 = _mm256_loadu_ps(v + j * v_stride);
    const __m256 v1 = _mm256_loadu_ps(v + j * v_stride + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 pb = _mm256_broadcast_ss(p + r * p_stride + j);
      lo[r] = _mm256_fmadd_ps(pb, v0, lo[r]);
      hi[r] = _mm256_fmadd_ps(pb, v1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * acc_stride, lo[r]);
    _mm256_storeu_ps(acc + r * acc_stride + 8, hi[r]);
  }
}

AVX2 float softmax_numerators_avx2(float* row, const float* rel_h, const float* rel_w,
                                   int64_t height, int64_t width) {
  const __m256 lowest = _mm256_set1_ps(-INFINITY);
  __m256 vmax = lowest;
  for (int64_t y = 0; y < height; ++y) {
    const __m256 bh = _mm256_set1_ps(rel_h[y]);
    float* s = row + y * width;
    for (int64_t x = 0; x < width; x += 8) {
      const __m256i m = lanes_below(width - x);
      __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_maskload_ps(s + x, m), bh),
                               _mm256_maskload_ps(rel_w + x, m));
      _mm256_maskstore_ps(s + x, m, t);
      vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(lowest, t, _mm256_castsi256_ps(m)));
    }
  }
  const __m256 mx = _mm256_set1_ps(hmax(vmax));
  const int64_t seq = height * width;
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t j = 0; j < seq; j += 8) {
    const __m256i m = lanes_below(seq - j);
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_maskload_ps(row + j, m), mx));
    _mm256_maskstore_ps(row + j, m, e);
    vsum = _mm256_add_ps(vsum, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
  }
  return hsum(vsum);
}

AVX2 void tile_avx2(const Problem& p, int64_t b, int64_t n, int64_t i0, int64_t rows,
                    Scratch& t) {
  const auto& s = p.shape;
  const int64_t d_n = s.head_dim, seq = s.seq(), stride = p.panels * kPanel;
  const float* kt = p.kt + (b * s.heads + n) * p.panels * d_n * kPanel;
  for (int64_t pi = 0; pi < p.panels; ++pi)
    qk_rows_avx2<4>(rows, t.qtile.data(), d_n, kt + pi * d_n * kPanel,
                    t.scores.data() + pi * kPanel, stride);
  float inv[kTileRows];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = (b * seq + i0 + r) * s.heads + n;
    inv[r] = 1.f / softmax_numerators_avx2(t.scores.data() + r * stride,
                                           p.rel_h + pos * s.height, p.rel_w + pos * s.width,
                                           s.height, s.width);
  }
  std::fill(t.acc.begin(), t.acc.begin() + rows * d_n, 0.f);
  const float* v = p.vp + (b * s.heads + n) * seq * d_n;
  const float* sc = t.scores.data();
  for (int64_t j0 = 0; j0 < seq; j0 += kKeyBlock) {
    const int64_t j1 = std::min(seq, j0 + kKeyBlock);
    for (int64_t c = 0; c < d_n; c += 16) {
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4)
        pv_block_avx2<4>(sc + r * stride, stride, v + c, d_n, j0, j1, t.acc.data() + r * d_n + c,
                         d_n);
      for (; r < rows; ++r)
        pv_block_avx2<1>(sc + r * stride, stride, v + c, d_n, j0, j1, t.acc.data() + r * d_n + c,
                         d_n);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = p.out + ((b * seq + i0 + r) * s.heads + n) * d_n;
    for (int64_t d = 0; d < d_n; ++d) o[d] = t.acc[r * d_n + d] * inv[r];
  }
}

#endif  // CELLSAM_X86

// ---------------------------------------------------------------- portable path
void tile_portable(const Problem& p, int64_t b, int64_t n, int64_t i0, int64_t rows,
                   Scratch& t) {
  const auto& s = p.shape;
  const int64_t d_n = s.head_dim, seq = s.seq(), stride = p.panels * kPanel;
  const float* kt = p.kt + (b * s.heads + n) * p.panels * d_n * kPanel;
  for (int64_t r = 0; r < rows; ++r) {
    const float* q = t.qtile.data() + r * d_n;
    float* row = t.scores.data() + r * stride;
    const int64_t pos = (b * seq + i0 + r) * s.heads + n;
    const float *rh = p.rel_h + pos * s.height, *rw = p.rel_w + pos * s.width;
    float mx = -INFINITY;
    for (int64_t j = 0; j < seq; ++j) {
      const float* panel = kt + (j / kPanel) * d_n * kPanel + j % kPanel;
      float dot = 0.f;
      for (int64_t d = 0; d < d_n; ++d) dot += q[d] * panel[d * kPanel];
      row[j] = dot + rh[j / s.width] + rw[j % s.width];
      mx = std::max(mx, row[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < seq; ++j) sum += (row[j] = std::exp(row[j] - mx));
    float* acc = t.acc.data();
    std::fill(acc, acc + d_n, 0.f);
    for (int64_t j = 0; j < seq; ++j) {
      const float* vj = row_of(p.v, s, b, j, n);
      for (int64_t d = 0; d < d_n; ++d) acc[d] += row[j] * vj[d];
    }
    float* o = p.out + ((b * seq + i0 + r) * s.heads + n) * d_n;
    for (int64_t d = 0; d < d_n; ++d) o[d] = acc[d] / sum;
  }
}

void run_tile(void* data, size_t item) {
  const auto& p = *static_cast<Problem*>(data);
  const auto& s = p.shape;
  const int64_t per_batch = s.heads * p.tiles;
  const int64_t b = item / per_batch, n = (item % per_batch) / p.tiles;
  const int64_t i0 = (item % p.tiles) * kTileRows;
  const int64_t rows = std::min(kTileRows, s.seq() - i0), d_n = s.head_dim;
  Scratch& t = tls_scratch;
  const size_t score_size = static_cast<size_t>(kTileRows * p.panels * kPanel);
  if (t.scores.size() < score_size) t.scores.resize(score_size);
  if (t.qtile.size() < static_cast<size_t>(kTileRows * d_n)) {
    t.qtile.resize(kTileRows * d_n);
    t.acc.resize(kTileRows * d_n);
  }
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(t.qtile.data() + r * d_n, row_of(p.q, s, b, i0 + r, n), d_n * sizeof(float));
  switch (p.isa) {
#ifdef CELLSAM_X86
    case Isa::kAvx512: tile_avx512(p, b, n, i0, rows, t); break;
    case Isa::kAvx2: tile_avx2(p, b, n, i0, rows, t); break;
#endif
    default: tile_portable(p, b, n, i0, rows, t); break;
  }
}

}  // namespace

Isa best_isa() {
  Isa isa = Isa::kPortable;
#ifdef CELLSAM_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f")) isa = Isa::kAvx512;
#endif
  // CELLSAM_RT_KERNEL_ISA=avx2|portable caps it (tests of every path, comparisons).
  if (const char* cap = std::getenv("CELLSAM_RT_KERNEL_ISA")) {
    if (std::strcmp(cap, "portable") == 0) isa = Isa::kPortable;
    if (std::strcmp(cap, "avx2") == 0 && isa == Isa::kAvx512) isa = Isa::kAvx2;
  }
  return isa;
}

const char* relpos_attention(const AttentionShape& shape, const float* q, const float* k,
                             const float* v, const float* rel_h, const float* rel_w, float* out,
                             ParallelFor parallel_for, void* runner) {
  if (shape.batch < 0 || shape.heads <= 0 || shape.height <= 0 || shape.width <= 0 ||
      shape.head_dim <= 0)
    return "RelPosAttention: empty heads, height, width or head size";
  if (shape.batch == 0) return nullptr;
  Problem p{shape, q, k, v, rel_h, rel_w, out, nullptr, nullptr, 0, 0, Isa::kPortable};
  p.panels = (shape.seq() + kPanel - 1) / kPanel;
  p.tiles = (shape.seq() + kTileRows - 1) / kTileRows;
  // The vector kernels take head sizes in whole 16-channel groups; AVX-512 keeps a V row in at
  // most four registers.
  p.isa = shape.head_dim % 16 == 0 ? best_isa() : Isa::kPortable;
  if (p.isa == Isa::kAvx512 && shape.head_dim > 64) p.isa = Isa::kAvx2;
  // Packed copies of K and V (every element written by pack_keys_values: no zeroing pass).
  std::unique_ptr<float[]> kt(new float[static_cast<size_t>(shape.batch * shape.heads *
                                                            p.panels * shape.head_dim * kPanel)]);
  std::unique_ptr<float[]> vp(new float[static_cast<size_t>(shape.batch * shape.heads *
                                                            shape.seq() * shape.head_dim)]);
  p.kt = kt.get();
  p.vp = vp.get();
  parallel_for(runner, pack_keys_values, static_cast<size_t>(shape.batch * shape.heads), &p);
  parallel_for(runner, run_tile, static_cast<size_t>(shape.batch * shape.heads * p.tiles), &p);
  return nullptr;
}

}  // namespace cellsam
