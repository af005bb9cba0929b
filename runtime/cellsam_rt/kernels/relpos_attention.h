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

// Instruction sets with a vector path; kPortable is plain C++ (correct, but ~20x slower).
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The best path this CPU runs, capped by $CELLSAM_RT_KERNEL_ISA ("avx2" or "portable").
Isa best_isa();

}  // namespace cellsam
