// The CUDA backend's kernel interface: plain structs of raw pointers and one launcher per
// kernel family, so that the kernels (epilogues.cu, compiled by nvcc for sm_80 and sm_90) see
// no ATen/c10 header and the host glue (ops_cuda.cpp: chunk loop, GEMMs, registration) sees no
// device code. Element math: csrc/include/mmloss/tile_math.h (shared with the CPU backend).
//
// Conventions (one row chunk of the logit matrix at a time):
// - A chunk is `rows` rows × `m` columns of a row-major fp32 matrix with leading dimension
//   `ld` (≥ m); its row r is global row `row0 + r`. The GEMM writes the raw product
//   R = x_c·yᵀ; the kernels form S = s_i·R (one fp32 multiply, never fused into an FMA, so a
//   backward reproduces every forward logit bit for bit) and set excluded pairs to −inf.
//   With `prescaled` the chunk already holds S (similarity_lse's kept logits).
// - `vec`: the host promises ld % 4 == 0 and a 16-byte aligned base, so rows load as float4;
//   otherwise the kernels read scalars (kept logits with M % 4 != 0).
// - Statistics records follow the torch backend (mmloss/ops/torch_chunked.py, torch_kl.py):
//   softmax [shift, sum] with shift = finite_or_zero(exact max); KL [max_s, sum_s, max_t, sum_t].
//   A (2, K) or (4, K) record tensor is passed as its base pointer and K (plane stride).
// - Tiles are TILE_ROWS × TILE_COLS; per-tile partials go to fixed slots and a combine kernel
//   merges them in slot order: every result is deterministic (no atomics).
// - Every launcher runs on `stream` and returns cudaGetLastError() of its launch(es).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "mmloss/tile_math.h"  // MMLOSS_HD; no ATen either

namespace mmloss {
namespace cuda {

constexpr int TILE_ROWS = 32;   // rows of a tile: 8 warps × 4 rows each
constexpr int TILE_COLS = 128;  // columns of a tile: 32 lanes × 4 (one float4 per lane and row)

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Number of tiles along a dimension.
MMLOSS_HD inline int64_t tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// A scale s_i: `ptr` (fp32, on the device) holds one value per global row when `per_row`, one
// value when not; `ptr == nullptr` means the host value `value`.
struct Scale {
  const float* ptr;
  float value;
  bool per_row;
};

// A 0-d fp32 device value or a host value (the bias).
struct Scalar {
  const float* ptr;
  float value;
};

// Marked pairs: kind is tile::MarkKind; labels int64 (N,) / (M,) for MARK_SAME_LABEL.
struct Marks {
  int kind;
  int64_t offset;
  const int64_t* x_labels;
  const int64_t* y_labels;
};

// The chunk a tile kernel reads (and, with write_back, rewrites as S).
struct Chunk {
  float* data;
  int64_t ld;
  int64_t rows;
  int64_t m;
  int64_t row0;
  bool vec;
  bool prescaled;
};

// ------------------------------------------------------------------------ similarity_lse

// Forward tile pass: row partials [shift, sum] per (column tile, row) into
// row_part[(f·ntc + tc)·rows + r] (f = 0 shift, 1 sum; ntc = tiles(m, TILE_COLS)) when
// non-null; column partials per (row tile, column) into col_part[(f·ntr + tr)·m + j]
// (ntr = tiles(rows, TILE_ROWS)) when non-null. write_back: store S (scaled, −inf on
// excluded pairs) into the chunk (kept logits).
struct LseForward {
  Chunk chunk;
  Scale scale;
  Marks marks;
  bool write_back;
  float* row_part;
  float* col_part;
};

// Combine of one chunk: rows (when row_stats) merge their column-tile partials in order into
// row_stats (2, n_total) and row_lse; columns (when col_stats) merge their row-tile partials
// in order into the running col_stats (2, m) (read unless `first`), and on the `last` chunk
// write col_lse.
struct LseCombine {
  const float* row_part;
  const float* col_part;
  int64_t rows, m, row0, n_total;
  Scalar bias;
  float* row_stats;
  float* row_lse;
  float* col_stats;
  float* col_lse;
  bool first, last;
};

// Backward tile pass: G = w_r·exp(S − r) + w_c·exp(S − c) on allowed pairs (0 elsewhere), the
// row term when row_grad, the column term when col_grad (w = grad/sum, 0 where sum == 0);
// written in the operands' dtype to g (leading dimension ldg, a multiple of 4).
struct LseBackward {
  Chunk chunk;
  Scale scale;
  Marks marks;
  const float* row_stats;  // (2, n_total)
  const float* row_grad;   // (n_total,) or null
  int64_t n_total;
  const float* col_stats;  // (2, m)
  const float* col_grad;   // (m,) or null
  void* g;
  int64_t ldg;
};

// ------------------------------------------------------------------------ pairwise_sigmoid

// Forward tile pass: Σ_j softplus(T_ij) per (column tile, row) into row_part[tc·rows + r],
// T = ±(S + bias) (− on positives).
struct SigmoidForward {
  Chunk chunk;
  Scale scale;
  Marks marks;
  Scalar bias;
  float* row_part;
};

// Backward tile pass: G = ±sigmoid(T)·(row_grad ? row_grad[i] : 1) into g (operand dtype);
// partials per (column tile, row): Σ_j G into row_part[tc·rows + r] and, when with_loss,
// Σ_j softplus(T) into row_part[(ntc + tc)·rows + r].
struct SigmoidBackward {
  Chunk chunk;
  Scale scale;
  Marks marks;
  Scalar bias;
  const float* row_grad;
  bool with_loss;
  float* row_part;
  void* g;
  int64_t ldg;
};

// Sums of a chunk's row partials: out[f][row0 + r] = Σ_tc row_part[(f·ntc + tc)·rows + r]
// for f < fields (out planes of stride n_total).
struct RowSums {
  const float* row_part;
  int64_t rows, m, row0, n_total;
  int fields;
  float* out;
};

// ------------------------------------------------------------------------ similarity_kl

// Forward tile pass on the student chunk S and the teacher chunk T (same ld, rows, m; both raw
// products scaled by scale_s / scale_t): the six statistics [max_s, sum_s, max_t, sum_t,
// weighted, entropy] per (column tile, row) into row_part[(f·ntc + tc)·rows + r] and per
// (row tile, column) into col_part[(f·ntr + tr)·m + j] (each when non-null).
struct KlForward {
  Chunk student;
  const float* teacher;
  Scale scale_s, scale_t;
  bool cross_entropy;
  float* row_part;
  float* col_part;
};

// Combine: rows (when row) merge into row (KL or cross-entropy) and row_stats (4, n_total);
// columns (when col_run) merge into the running col_run (6, m) (read unless first) and on the
// last chunk write col and col_stats (4, m).
struct KlCombine {
  const float* row_part;
  const float* col_part;
  int64_t rows, m, row0, n_total;
  bool cross_entropy;
  float* row;
  float* row_stats;
  float* col_run;
  float* col;
  float* col_stats;
  bool first, last;
};

// Backward tile pass: G = row term + column term (tile::kl_grad_term), into g (operand dtype).
struct KlBackward {
  Chunk student;
  const float* teacher;
  Scale scale_s, scale_t;
  const float* row_stats;  // (4, n_total)
  const float* row_grad;   // or null
  int64_t n_total;
  const float* col_stats;  // (4, m)
  const float* col_grad;   // or null
  void* g;
  int64_t ldg;
};

// ------------------------------------------------------------------------ feature gradients

// Per row of a chunk (one warp per row), with A = G·y (fp32, rows × d, contiguous) and x_c
// (operand dtype, rows × d, contiguous): dscale[row0 + r] = ⟨x_r, A_r⟩ when dscale;
// dx[r] = s_r·A_r in out_dtype (operand dtype or fp32) when dx; xs[r] = s_r·x_r in the operand
// dtype when xs (the dy GEMM's operand under a per-row scale).
struct RowGrads {
  const float* a;
  const void* x;
  int64_t rows, d, row0;
  Scale scale;
  void* dx;
  DType out_dtype;
  float* dscale;
  void* xs;
};

// out[0] = Σ_i term(a_i) + Σ_j term(b_j) in a fixed order (one block), term(v) = v, or
// tile::allowed_grad(v, gate_v) when the gate pointer is non-null; b may be null.
struct OrderedSum {
  const float* a;
  const float* gate_a;
  int64_t n;
  const float* b;
  const float* gate_b;
  int64_t m;
  float* out;
};

cudaError_t lse_forward(const LseForward& args, cudaStream_t stream);
cudaError_t lse_combine(const LseCombine& args, cudaStream_t stream);
cudaError_t lse_backward(const LseBackward& args, DType g_dtype, cudaStream_t stream);
cudaError_t sigmoid_forward(const SigmoidForward& args, cudaStream_t stream);
cudaError_t sigmoid_backward(const SigmoidBackward& args, DType g_dtype, cudaStream_t stream);
cudaError_t row_sums(const RowSums& args, cudaStream_t stream);
cudaError_t kl_forward(const KlForward& args, cudaStream_t stream);
cudaError_t kl_combine(const KlCombine& args, cudaStream_t stream);
cudaError_t kl_backward(const KlBackward& args, DType g_dtype, cudaStream_t stream);
cudaError_t row_grads(const RowGrads& args, DType x_dtype, cudaStream_t stream);
cudaError_t ordered_sum(const OrderedSum& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmloss
