// Attention with SAM's decomposed relative positions, tiled so the scores never leave cache.
//
//   out[b, i, n, :] = softmax_j(q_i . k_j + rel_h[b, i, n, row(j)] + rel_w[b, i, n, col(j)]) v_j
//
// q (already scaled), k, v and out are packed [B, S, heads * D] (S = H * W tokens, row-major);
// rel_h is [B, S, heads, H], rel_w [B, S, heads, W]. Exact in FP32 up to summation order.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cellsam {

struct AttentionShape {
  int64_t batch, heads, head_dim, height, width;
  int64_t seq() const { return height * width; }
};

// Runs fn(data, i) for i in [0, total), possibly on several threads; returns when all are done.
using ParallelFor = void (*)(void* runner, void (*fn)(void* data, size_t i), size_t total,
                             void* data);

// nullptr on success, else a static message naming what is wrong with the shapes.
const char* relpos_attention(const AttentionShape& shape, const float* q, const float* k,
                             const float* v, const float* rel_h, const float* rel_w, float* out,
                             ParallelFor parallel_for, void* runner);

// Whether this CPU runs the AVX-512 kernels (else a portable, much slower path).
bool has_avx512();

}  // namespace cellsam
