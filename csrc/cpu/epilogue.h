// The CPU backend's fused epilogues: one pass over a block of rows of a logit chunk (already
// produced by the GEMM), as plain functions on raw pointers so that they can be compiled once
// per instruction set (epilogue_<isa>.cpp include epilogue_impl.h) and picked at run time.
// No ATen types cross this interface; the element math is csrc/include/mmloss/tile_math.h.
//
// Layout: a block is `rows` rows of a row-major chunk with leading dimension `ld` (≥ m), the
// first row being global row `row0`. Statistics follow the torch backend
// (mmloss/ops/torch_chunked.py): [shift, sum] with shift = finite_or_zero(exact max).
#pragma once

#include <stdint.h>

namespace mmloss {
namespace cpu {

// Which pairs are marked: kind is tile::MarkKind; labels are int64 (widened by the caller).
struct Marks {
  int kind;
  int64_t offset;
  const int64_t* x_labels;  // (N,) when kind == MARK_SAME_LABEL
  const int64_t* y_labels;  // (M,)
};

template <typename scalar_t>
struct Epilogues {
  // similarity_lse forward. Sets marked pairs of S to −inf (when mark_s) and reads it:
  // row_shift/row_sum (rows,) when non-null; col_max (exact block max, NaN propagating) and
  // col_sum (relative to finite_or_zero(col_max)) (m,) block partials when non-null, using
  // col_scratch (m,) as scratch. With both directions, one exponential per pair serves both
  // when the block allows it (tile::kFactorSpan).
  void (*lse_forward)(scalar_t* S, int64_t ld, int64_t rows, int64_t m, int64_t row0, const Marks& marks,
                      bool mark_s, scalar_t* row_shift, scalar_t* row_sum, scalar_t* col_max, scalar_t* col_sum,
                      scalar_t* col_scratch);
  // similarity_lse backward: G = w_r·exp(S − r) + w_c·exp(S − c) (each term where its pointers
  // are non-null), G written to `G` (may equal S; ldg its leading dimension). Marked pairs of S
  // are set to −inf first when mark_s (S must then be writable). col_scratch (m,), when
  // non-null, lets both terms share one exponential (tile::kFactorSpan).
  void (*lse_backward)(scalar_t* S, int64_t ld, scalar_t* G, int64_t ldg, int64_t rows, int64_t m, int64_t row0,
                       const Marks& marks, bool mark_s, const scalar_t* row_shift, const scalar_t* row_weight,
                       const scalar_t* col_shift, const scalar_t* col_weight, scalar_t* col_scratch);
  // tile::lse_merge_parts for m columns: `parts` partial records (max maxes[b·stride + j], sum
  // sums[b·stride + j]) merged in order into running_max / running_sum (m,).
  void (*lse_merge_cols)(scalar_t* running_max, scalar_t* running_sum, const scalar_t* maxes, const scalar_t* sums,
                         int64_t parts, int64_t stride, int64_t m);
  // pairwise_sigmoid: T = ±(S + bias) (− on positives). row_loss[r] = Σ_j softplus(T) when
  // non-null. When want_grad: S becomes G = ±sigmoid(T)·(row_grad ? row_grad[r] : 1) in place and
  // row_gsum[r] = Σ_j G (when non-null). sign_scratch (m,) is scratch.
  void (*sigmoid)(scalar_t* S, int64_t ld, int64_t rows, int64_t m, int64_t row0, const Marks& marks,
                  scalar_t bias, scalar_t* row_loss, bool want_grad, const scalar_t* row_grad, scalar_t* row_gsum,
                  scalar_t* sign_scratch);
  // similarity_kl forward on a student block S and teacher block T (same shape). rows: the six
  // row statistics [max_s, sum_s, max_t, sum_t, weighted, entropy] into row_out[k*row_stride + r]
  // when row_out is non-null. cols: block partials of the same six per column into
  // col_out[k*m + j] (relative to the block's own maxima) when col_out is non-null.
  // entropy is computed only when cross_entropy.
  void (*kl_forward)(const scalar_t* S, const scalar_t* T, int64_t ld, int64_t rows, int64_t m,
                     bool cross_entropy, scalar_t* row_out, int64_t row_stride, scalar_t* col_out);
  // similarity_kl backward: G = row term + column term (kl_grad_term), into S in place.
  // row: (max_s, w_s, max_t, w_t) per row, col: the same per column; null pointers skip a term.
  void (*kl_backward)(scalar_t* S, const scalar_t* T, int64_t ld, int64_t rows, int64_t m,
                      const scalar_t* row_max_s, const scalar_t* row_w_s, const scalar_t* row_max_t,
                      const scalar_t* row_w_t, const scalar_t* col_max_s, const scalar_t* col_w_s,
                      const scalar_t* col_max_t, const scalar_t* col_w_t);
  // out[k] = in[k]·mult for k < n (contiguous; out may equal in): one IEEE product per element,
  // so the values are those of the scalar loop on any ISA.
  void (*scale_copy)(const scalar_t* in, scalar_t* out, int64_t n, scalar_t mult);
};

// One table per instruction set and dtype (defined in epilogue_<isa>.cpp).
const Epilogues<float>& epilogues_f32_default();
const Epilogues<double>& epilogues_f64_default();
#if defined(__x86_64__) || defined(_M_X64)
#define MMLOSS_HAVE_AVX2_EPILOGUES 1
const Epilogues<float>& epilogues_f32_avx2();
const Epilogues<double>& epilogues_f64_avx2();
const Epilogues<float>& epilogues_f32_avx512();
const Epilogues<double>& epilogues_f64_avx512();
#endif

}  // namespace cpu
}  // namespace mmloss
