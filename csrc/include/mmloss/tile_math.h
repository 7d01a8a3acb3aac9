// Tile math shared by the C++ backends: the `cpu` backend (csrc/cpu, host code, scalar and
// at::vec lanes) and the `cuda` backend (csrc/cuda, device code). One definition of each
// element function, so the logic the CUDA kernels run is the logic the CPU tests exercise.
//
// Conventions (the same as the torch backend, mmloss/ops/torch_chunked.py and torch_kl.py):
// - S = s·⟨x_i, y_j⟩ is the logit without bias; marked pairs excluded from a softmax are −inf.
// - A softmax statistics record of one row (column) is [shift, sum]: shift the exact maximum
//   of the allowed S values (0 where every pair is excluded: finite_or_zero), sum = Σ exp(S −
//   shift). LSE = log(sum) + shift (+ bias); −inf where sum == 0.
// - similarity_kl records are [max_s, sum_s, max_t, sum_t] (student, teacher; no exclusions).
//
// No ATen/c10 includes here. Every function is `MMLOSS_HD inline` (host+device under nvcc).
// Element functions that sit on the hot path are templates over the lane type T: float or
// double here; the CPU backend adds at::vec::Vectorized<float> by specialising `Math<T>`.
// Function names are stable (callers in csrc/cpu and csrc/cuda): add, do not rename.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMLOSS_HD __host__ __device__
#else
#define MMLOSS_HD
#endif

namespace mmloss {
namespace tile {

// ------------------------------------------------------------------------------------------
// Lane math. Math<T> is specialised per lane type; float/double here.

template <typename T>
struct Math;

template <>
struct Math<float> {
  static MMLOSS_HD inline float exp(float v) { return ::expf(v); }
  static MMLOSS_HD inline float log(float v) { return ::logf(v); }
  static MMLOSS_HD inline float log1p(float v) { return ::log1pf(v); }
  static MMLOSS_HD inline float abs(float v) { return ::fabsf(v); }
  static MMLOSS_HD inline float zero() { return 0.0f; }
  static MMLOSS_HD inline float one() { return 1.0f; }
  // max that propagates NaN (as torch.amax / torch.maximum do).
  static MMLOSS_HD inline float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }
  // plain max (NaN in b is dropped, NaN in a kept): for sums of non-negative terms etc.
  static MMLOSS_HD inline float max(float a, float b) { return a > b ? a : b; }
  // t >= 0 ? a : b (NaN t → b).
  static MMLOSS_HD inline float where_nonneg(float t, float a, float b) { return t >= 0.0f ? a : b; }
};

template <>
struct Math<double> {
  static MMLOSS_HD inline double exp(double v) { return ::exp(v); }
  static MMLOSS_HD inline double log(double v) { return ::log(v); }
  static MMLOSS_HD inline double log1p(double v) { return ::log1p(v); }
  static MMLOSS_HD inline double abs(double v) { return ::fabs(v); }
  static MMLOSS_HD inline double zero() { return 0.0; }
  static MMLOSS_HD inline double one() { return 1.0; }
  static MMLOSS_HD inline double max_nan(double a, double b) { return (a != a || a > b) ? a : b; }
  static MMLOSS_HD inline double max(double a, double b) { return a > b ? a : b; }
  static MMLOSS_HD inline double where_nonneg(double t, double a, double b) { return t >= 0.0 ? a : b; }
};

// ------------------------------------------------------------------------------------------
// Scalars (float or double only).

template <typename T>
MMLOSS_HD inline T neg_inf() {
  return -static_cast<T>(INFINITY);
}

template <typename T>
MMLOSS_HD inline T quiet_nan() {
  return static_cast<T>(NAN);
}

// False for ±inf and NaN.
MMLOSS_HD inline bool is_finite(float v) { return ::fabsf(v) <= 3.4028234663852886e38f; }
MMLOSS_HD inline bool is_finite(double v) { return ::fabs(v) <= 1.7976931348623157e308; }

// The shift of a statistics record: the maximum where finite, else 0 (all excluded: −inf;
// NaN also maps to 0, as torch.where(isfinite(t), t, 0) does; the NaN then reaches the sum).
template <typename T>
MMLOSS_HD inline T finite_or_zero(T v) {
  return is_finite(v) ? v : T(0);
}

// A logit-gradient entry below the smallest normal number becomes 0 before it feeds a GEMM:
// subnormal operands slow x86 GEMMs down by an order of magnitude, and such an entry is below
// fp32 resolution next to any normal contribution. NaN and ±inf are kept.
MMLOSS_HD inline float flush_subnormal(float v) { return ::fabsf(v) < 1.17549435e-38f ? 0.0f : v; }
MMLOSS_HD inline double flush_subnormal(double v) { return ::fabs(v) < 2.2250738585072014e-308 ? 0.0 : v; }

// ------------------------------------------------------------------------------------------
// Marks: which pairs are "marked" (excluded from a softmax, or the positives of a sigmoid).

enum MarkKind : int { MARK_NONE = 0, MARK_DIAGONAL = 1, MARK_SAME_LABEL = 2 };

// Pair (i, j) is on the marked diagonal: j == i + offset (global indices, any offset sign).
MMLOSS_HD inline bool diagonal_marked(int64_t i, int64_t j, int64_t offset) { return j == i + offset; }

// The column of row i's diagonal mark, or −1 when it falls outside [0, m).
MMLOSS_HD inline int64_t diagonal_column(int64_t i, int64_t offset, int64_t m) {
  const int64_t j = i + offset;
  return (j >= 0 && j < m) ? j : -1;
}

// Pair (i, j) has the same label (labels are int64; int32 labels are widened by the caller).
MMLOSS_HD inline bool label_marked(int64_t x_label, int64_t y_label) { return x_label == y_label; }

MMLOSS_HD inline bool marked(int kind, int64_t i, int64_t j, int64_t offset, int64_t x_label, int64_t y_label) {
  return kind == MARK_DIAGONAL ? diagonal_marked(i, j, offset)
                               : (kind == MARK_SAME_LABEL ? label_marked(x_label, y_label) : false);
}

// ------------------------------------------------------------------------------------------
// Online log-sum-exp records [shift, sum].

template <typename T>
struct LseStats {
  T shift;
  T sum;
};

// The empty record (no allowed pair yet): shift 0, sum 0. Running maxima start at −inf.
template <typename T>
MMLOSS_HD inline LseStats<T> lse_empty() {
  return LseStats<T>{T(0), T(0)};
}

// Rescale a running sum taken relative to `old_max` to the new shift: sum·exp(old_max − shift).
// old_max = −inf (nothing seen yet) gives 0·0 = 0.
template <typename T>
MMLOSS_HD inline T lse_rescale(T sum, T old_max, T new_shift) {
  return sum * Math<T>::exp(old_max - new_shift);
}

// One online step of a running (max, sum) pair with a tile's (tile_max, tile_sum) where the
// tile sum is relative to tile_max: returns the record relative to the new exact max (whose
// shift is finite_or_zero(max)); `running_max` is updated to the new max (NaN propagates).
// This is the column merge of the torch backend across row chunks.
template <typename T>
MMLOSS_HD inline T lse_online_step(T& running_max, T running_sum, T tile_max, T tile_sum) {
  const T new_max = Math<T>::max_nan(running_max, tile_max);
  const T shift = finite_or_zero(new_max);
  const T total = lse_rescale(running_sum, running_max, shift) + lse_rescale(tile_sum, tile_max, shift);
  running_max = new_max;
  return total;
}

// A partial sum taken relative to its own exact max `part_max` (shift finite_or_zero(part_max)),
// rescaled to `shift`: 0 for an empty part (max −inf), the sum itself when the part holds the
// overall max (exp(0) = 1, no exponential), NaN propagating.
template <typename T>
MMLOSS_HD inline T lse_part_rescaled(T part_sum, T part_max, T shift) {
  if (part_max == neg_inf<T>()) return T(0);
  if (part_max == shift) return part_sum;
  return part_sum * Math<T>::exp(part_max - shift);
}

// Merge k partial records of the same column (or row) in order into a running (max, sum): the
// new exact max over all, one rescale per part (lse_part_rescaled). Part b's max is
// maxes[b·stride], its sum sums[b·stride]. Returns the new sum; running_max becomes the new max.
template <typename T>
MMLOSS_HD inline T lse_merge_parts(T& running_max, T running_sum, const T* maxes, const T* sums, int64_t k,
                                   int64_t stride) {
  T mx = running_max;
  for (int64_t b = 0; b < k; ++b) mx = Math<T>::max_nan(mx, maxes[b * stride]);
  const T shift = finite_or_zero(mx);
  T total = lse_part_rescaled(running_sum, running_max, shift);
  for (int64_t b = 0; b < k; ++b) total += lse_part_rescaled(sums[b * stride], maxes[b * stride], shift);
  running_max = mx;
  return total;
}

// Merge two records of disjoint column sets of the same rows (torch_chunked.merge_lse_stats):
// a record with sum 0 holds no allowed pair and does not take part in the shift.
template <typename T>
MMLOSS_HD inline LseStats<T> lse_merge(LseStats<T> a, LseStats<T> b) {
  const T ma = a.sum == T(0) ? neg_inf<T>() : a.shift;
  const T mb = b.sum == T(0) ? neg_inf<T>() : b.shift;
  const T shift = finite_or_zero(Math<T>::max_nan(ma, mb));
  const T ta = a.sum == T(0) ? T(0) : a.sum * Math<T>::exp(a.shift - shift);
  const T tb = b.sum == T(0) ? T(0) : b.sum * Math<T>::exp(b.shift - shift);
  return LseStats<T>{shift, ta + tb};
}

// log-sum-exp of a record plus bias; −inf where sum == 0 (log 0).
template <typename T>
MMLOSS_HD inline T lse_value(T shift, T sum, T bias) {
  return Math<T>::log(sum) + shift + bias;
}

// ------------------------------------------------------------------------------------------
// Softmax (similarity_lse) backward epilogue.

// grad / sum: the factor turning exp(S − shift) into upstream grad × probability; 0 where no
// pair was allowed (sum 0).
template <typename T>
MMLOSS_HD inline T probability_weight(T grad, T sum) {
  return sum == T(0) ? T(0) : grad / sum;
}

// A row's (column's) contribution to Σ_ij G_ij (the bias gradient): grad where the row has an
// allowed pair, 0 otherwise; NaN/Inf statistics propagate (grad + 0·sum).
template <typename T>
MMLOSS_HD inline T allowed_grad(T grad, T sum) {
  return sum == T(0) ? T(0) : grad + T(0) * sum;
}

// One direction's term of the logit gradient: w·exp(S − shift) (S = −inf on excluded pairs → 0).
template <typename T>
MMLOSS_HD inline T softmax_grad_term(T s, T shift, T weight) {
  return weight * Math<T>::exp(s - shift);
}

// One exponential per pair for both directions. For a block of rows with reference
// K = max of their row shifts r_i, exp(S − c) = exp(S − r)·exp(r − K)·exp(K − c), and the last
// two factors are a per-row and a per-column number: the column term costs a multiply-add, not a
// second exponential. Exact to a few ulp when every factor is a normal number wherever the term
// it feeds matters, which holds when K − c ≤ kFactorSpan for every column c that carries weight:
// exp(K − c) ≤ e^60 cannot overflow, and a pair whose exp(S − r) underflows (S < r − 87) has
// S − c < 60 − 87 = −27, a term below 2e−12 of that column's largest (fp32 keeps 6e−8). Blocks
// outside the span, or holding NaN/Inf, take the two-exponential form.
constexpr double kFactorSpan = 60.0;

// Both directions: G = w_r·exp(S − r) + w_c·exp(S − c).
template <typename T>
MMLOSS_HD inline T softmax_grad(T s, T row_shift, T row_weight, T col_shift, T col_weight) {
  return softmax_grad_term(s, row_shift, row_weight) + softmax_grad_term(s, col_shift, col_weight);
}

// ------------------------------------------------------------------------------------------
// Sigmoid (pairwise_sigmoid) epilogue. T = −z·L: the logit for negatives, its negation for
// positives (L = S + bias).

template <typename T>
MMLOSS_HD inline T signed_logit(T s, T bias, bool positive) {
  const T l = s + bias;
  return positive ? -l : l;
}

// softplus(t) = log(1 + e^t) and sigmoid(t) from one exponential e = exp(−|t|):
// softplus = max(t, 0) + log1p(e); sigmoid = t ≥ 0 ? 1/(1+e) : e/(1+e). Exact for large |t|
// (no threshold), NaN propagates, ±inf handled (softplus(−inf) = 0, sigmoid(+inf) = 1).
template <typename T>
MMLOSS_HD inline void softplus_sigmoid(T t, T& softplus, T& sigmoid) {
  const T e = Math<T>::exp(T(0) - Math<T>::abs(t));
  const T r = Math<T>::one() / (Math<T>::one() + e);
  softplus = Math<T>::max(t, Math<T>::zero()) + Math<T>::log1p(e);
  sigmoid = Math<T>::where_nonneg(t, r, e * r);
}

template <typename T>
MMLOSS_HD inline T softplus(T t) {
  const T e = Math<T>::exp(T(0) - Math<T>::abs(t));
  return Math<T>::max(t, Math<T>::zero()) + Math<T>::log1p(e);
}

template <typename T>
MMLOSS_HD inline T sigmoid(T t) {
  const T e = Math<T>::exp(T(0) - Math<T>::abs(t));
  const T r = Math<T>::one() / (Math<T>::one() + e);
  return Math<T>::where_nonneg(t, r, e * r);
}

// d softplus(T)/dL: sigmoid(T) for negatives, −sigmoid(T) for positives (T = −L there).
template <typename T>
MMLOSS_HD inline T sigmoid_logit_grad(T sigmoid_t, bool positive) {
  return positive ? -sigmoid_t : sigmoid_t;
}

// ------------------------------------------------------------------------------------------
// similarity_kl epilogues. Per row (column), student logits S and teacher logits T.

// Running per-column (or per-row) KL statistics: the student's max and sum, the teacher's max
// and sum, A = Σ e^{T − max_t}(T − S) and the entropy term Σ e^{T − max_t}(max_t − T), all
// relative to the current max (first == true until the first tile is added).
template <typename T>
struct KlStats {
  T max_s, sum_s, max_t, sum_t, weighted, entropy;
};

template <typename T>
MMLOSS_HD inline KlStats<T> kl_empty() {
  return KlStats<T>{neg_inf<T>(), T(0), neg_inf<T>(), T(0), T(0), T(0)};
}

// Merge a tile's statistics b (relative to its own maxima) into the running a. The teacher's
// entropy term moves with its max: Σ e^{T−m_new}(m_new − T) = r·[E_old + (m_new − m_old)·l_old].
// A side with no elements yet has max −inf and contributes nothing.
template <typename T>
MMLOSS_HD inline KlStats<T> kl_merge(KlStats<T> a, KlStats<T> b) {
  KlStats<T> out;
  out.max_s = Math<T>::max_nan(a.max_s, b.max_s);
  const T ra_s = a.sum_s == T(0) ? T(0) : Math<T>::exp(a.max_s - out.max_s);
  const T rb_s = b.sum_s == T(0) ? T(0) : Math<T>::exp(b.max_s - out.max_s);
  out.sum_s = a.sum_s * ra_s + b.sum_s * rb_s;
  out.max_t = Math<T>::max_nan(a.max_t, b.max_t);
  const bool a_has = a.sum_t != T(0);
  const bool b_has = b.sum_t != T(0);
  const T ra = a_has ? Math<T>::exp(a.max_t - out.max_t) : T(0);
  const T rb = b_has ? Math<T>::exp(b.max_t - out.max_t) : T(0);
  out.sum_t = a.sum_t * ra + b.sum_t * rb;
  out.weighted = a.weighted * ra + b.weighted * rb;
  const T ea = a_has ? (a.entropy + (out.max_t - a.max_t) * a.sum_t) * ra : T(0);
  const T eb = b_has ? (b.entropy + (out.max_t - b.max_t) * b.sum_t) * rb : T(0);
  out.entropy = ea + eb;
  return out;
}

// KL = A/l_t − LSE_t + LSE_s; cross-entropy H = KL + log l_t + E/l_t; clamped at 0 (rounding).
template <typename T>
MMLOSS_HD inline T kl_divergence(T weighted, T sum_t, T lse_s, T lse_t, T entropy, bool cross_entropy) {
  T out = weighted / sum_t - lse_t + lse_s;
  if (cross_entropy) out = out + entropy / sum_t + Math<T>::log(sum_t);
  return out < T(0) ? T(0) : out;  // NaN stays NaN
}

// The student-logit gradient term of one direction: w_s·exp(S − m_s) − w_t·exp(T − m_t), with
// w_s = grad/sum_s, w_t = grad/sum_t.
template <typename T>
MMLOSS_HD inline T kl_grad_term(T s, T t, T max_s, T weight_s, T max_t, T weight_t) {
  return weight_s * Math<T>::exp(s - max_s) - weight_t * Math<T>::exp(t - max_t);
}

}  // namespace tile
}  // namespace mmloss
