// Body of the CPU epilogues (interface: epilogue.h), included once per instruction set by
// epilogue_<isa>.cpp after defining CPU_CAPABILITY (DEFAULT, AVX2) and MMLOSS_ISA (the suffix of
// the table getters). Only at::vec (whose types live in the inline namespace CPU_CAPABILITY)
// and the tile math are included, so no inline function is compiled for two ISAs under one name.
//
// Reductions run lane-wise and then over the lanes in a fixed order: results depend on the data
// and the ISA only, never on the thread count.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>

#include "epilogue.h"
#include "mmloss/tile_math.h"

namespace mmloss {
namespace tile {

// at::vec lanes for the tile math of this ISA.
// exp on lanes: at::vec's (Sleef, 1 ulp, on AVX2). An inline Cephes polynomial measured no
// faster here, so the accurate one stays.
template <typename S>
inline at::vec::Vectorized<S> lane_exp(const at::vec::Vectorized<S>& v) {
  return v.exp();
}

template <typename S>
struct Math<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static inline V exp(const V& v) { return lane_exp<S>(v); }
  static inline V log(const V& v) { return v.log(); }
  static inline V log1p(const V& v) { return v.log1p(); }
  static inline V abs(const V& v) { return v.abs(); }
  static inline V zero() { return V(S(0)); }
  static inline V one() { return V(S(1)); }
  static inline V max_nan(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static inline V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static inline V where_nonneg(const V& t, const V& a, const V& b) { return V::blendv(b, a, t >= V(S(0))); }
};

}  // namespace tile

namespace cpu {
namespace CPU_CAPABILITY {
namespace {

namespace T_ = ::mmloss::tile;

template <typename S>
using Vec = at::vec::Vectorized<S>;

template <typename S>
constexpr int64_t W = Vec<S>::size();

template <typename S>
inline S hsum(const Vec<S>& v) {
  alignas(64) S tmp[Vec<S>::size()];
  v.store(tmp);
  S acc = tmp[0];
  for (int64_t k = 1; k < W<S>; ++k) acc += tmp[k];
  return acc;
}

template <typename S>
inline S hmax_nan(const Vec<S>& v) {
  alignas(64) S tmp[Vec<S>::size()];
  v.store(tmp);
  S acc = tmp[0];
  for (int64_t k = 1; k < W<S>; ++k) acc = T_::Math<S>::max_nan(acc, tmp[k]);
  return acc;
}

// tile::flush_subnormal on lanes: |v| < smallest normal → 0 (NaN kept: the compare is false).
template <typename S>
inline Vec<S> flush_subnormal(const Vec<S>& v) {
  return Vec<S>::blendv(v, Vec<S>(S(0)), v.abs() < Vec<S>(std::numeric_limits<S>::min()));
}

// The first `count` lanes of p, the rest `fill`.
template <typename S>
inline Vec<S> load_tail(const S* p, int64_t count, S fill) {
  return Vec<S>::set(Vec<S>(fill), Vec<S>::loadu(p, count), count);
}

template <typename S>
void apply_exclusions(S* s, int64_t m, int64_t i, const Marks& mk) {
  if (mk.kind == T_::MARK_DIAGONAL) {
    const int64_t j = T_::diagonal_column(i, mk.offset, m);
    if (j >= 0) s[j] = T_::neg_inf<S>();
  } else if (mk.kind == T_::MARK_SAME_LABEL) {
    const int64_t li = mk.x_labels[i];
    const int64_t* yl = mk.y_labels;
    for (int64_t j = 0; j < m; ++j)
      if (T_::label_marked(li, yl[j])) s[j] = T_::neg_inf<S>();
  }
}

// ----------------------------------------------------------------------------- similarity_lse

// The forward's test for the one-exponential form (tile::kFactorSpan): every block column max
// is finite or −inf (no NaN/+Inf anywhere in the block), and K − c ≤ span for the finite ones,
// K = max of the (finite) row shifts. Sets k_ref = K.
template <typename S>
bool factorable(const S* row_shift, int64_t rows, const S* col_max, int64_t m, S& k_ref) {
  if (rows <= 0) return false;
  S k = row_shift[0];
  for (int64_t r = 1; r < rows; ++r) k = std::max(k, row_shift[r]);
  S lowest = std::numeric_limits<S>::infinity();
  for (int64_t j = 0; j < m; ++j) {
    const S c = col_max[j];
    if (c == T_::neg_inf<S>()) continue;
    if (!std::isfinite(c)) return false;
    lowest = std::min(lowest, c);
  }
  k_ref = k;
  return !(k - lowest > static_cast<S>(T_::kFactorSpan));
}

template <typename S>
void lse_forward(S* Sm, int64_t ld, int64_t rows, int64_t m, int64_t row0, const Marks& marks, bool mark_s,
                 S* row_shift, S* row_sum, S* col_max, S* col_sum, S* col_shift) {
  using V = Vec<S>;
  constexpr int64_t w = W<S>;
  const S ninf = T_::neg_inf<S>();
  const int64_t mv = m - m % w;
  if (mark_s && marks.kind != T_::MARK_NONE)
    for (int64_t r = 0; r < rows; ++r) apply_exclusions(Sm + r * ld, m, row0 + r, marks);
  const bool do_cols = col_max != nullptr;
  if (do_cols)
    for (int64_t j = 0; j < m; ++j) col_max[j] = ninf;
  // Pass 1: row maxima and column maxima.
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = Sm + r * ld;
    V vmax(ninf);
    int64_t j = 0;
    for (; j < mv; j += w) {
      const V v = V::loadu(s + j);
      vmax = at::vec::maximum(vmax, v);
      if (do_cols) at::vec::maximum(V::loadu(col_max + j), v).store(col_max + j);
    }
    if (j < m) {
      const V v = load_tail(s + j, m - j, ninf);
      vmax = at::vec::maximum(vmax, v);
      if (do_cols) at::vec::maximum(load_tail(col_max + j, m - j, ninf), v).store(col_max + j, m - j);
    }
    if (row_shift != nullptr) row_shift[r] = T_::finite_or_zero(hmax_nan(vmax));
  }
  if (do_cols) {
    for (int64_t j = 0; j < m; ++j) {
      col_shift[j] = T_::finite_or_zero(col_max[j]);
      col_sum[j] = S(0);
    }
  }
  const bool do_row = row_sum != nullptr;
  // Both directions: one exponential per pair when the block's span allows (tile::kFactorSpan):
  // col_sum accumulates exp(S − r_i)·exp(r_i − K) = exp(S − K), rescaled by exp(K − c_j) at the end.
  S k_ref = S(0);
  if (do_row && do_cols && factorable(row_shift, rows, col_max, m, k_ref)) {
    for (int64_t r = 0; r < rows; ++r) {
      const S* s = Sm + r * ld;
      const V rs(row_shift[r]);
      const V a(std::exp(std::min(row_shift[r] - k_ref, S(0))));
      V acc(S(0));
      int64_t j = 0;
      for (; j < mv; j += w) {
        const V e = T_::Math<V>::exp(V::loadu(s + j) - rs);
        acc = acc + e;
        at::vec::fmadd(a, e, V::loadu(col_sum + j)).store(col_sum + j);
      }
      if (j < m) {
        const int64_t c = m - j;
        const V e = T_::Math<V>::exp(load_tail(s + j, c, ninf) - rs);
        acc = acc + e;
        at::vec::fmadd(a, e, V::loadu(col_sum + j, c)).store(col_sum + j, c);
      }
      row_sum[r] = hsum(acc);
    }
    // col_sum·exp(K − c_j), 0 for an empty column (max −inf): on lanes, one exponential per column.
    const V vk(k_ref), vninf(ninf), zero(S(0));
    int64_t j = 0;
    for (; j < m; j += w) {
      const int64_t c = std::min<int64_t>(w, m - j);
      const V rescaled = V::loadu(col_sum + j, c) * T_::Math<V>::exp(vk - V::loadu(col_shift + j, c));
      V::blendv(rescaled, zero, V::loadu(col_max + j, c) == vninf).store(col_sum + j, c);
    }
    return;
  }
  // Pass 2: sums of exp(S − shift), one exponential per direction.
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = Sm + r * ld;
    const V rs(do_row ? row_shift[r] : S(0));
    V acc(S(0));
    int64_t j = 0;
    for (; j < mv; j += w) {
      const V v = V::loadu(s + j);
      if (do_row) acc = acc + T_::Math<V>::exp(v - rs);
      if (do_cols) (V::loadu(col_sum + j) + T_::Math<V>::exp(v - V::loadu(col_shift + j))).store(col_sum + j);
    }
    if (j < m) {
      const int64_t c = m - j;
      const V v = load_tail(s + j, c, ninf);
      if (do_row) acc = acc + T_::Math<V>::exp(v - rs);
      if (do_cols) (V::loadu(col_sum + j, c) + T_::Math<V>::exp(v - V::loadu(col_shift + j, c))).store(col_sum + j, c);
    }
    if (do_row) row_sum[r] = hsum(acc);
  }
}

template <typename S>
void lse_backward(S* Sm, int64_t ld, S* G, int64_t ldg, int64_t rows, int64_t m, int64_t row0, const Marks& marks,
                  bool mark_s, const S* row_shift, const S* row_weight, const S* col_shift, const S* col_weight,
                  S* col_scratch) {
  using V = Vec<S>;
  constexpr int64_t w = W<S>;
  const int64_t mv = m - m % w;
  const bool do_row = row_weight != nullptr;
  const bool do_col = col_weight != nullptr;
  if (mark_s && marks.kind != T_::MARK_NONE)
    for (int64_t r = 0; r < rows; ++r) apply_exclusions(Sm + r * ld, m, row0 + r, marks);
  // Both directions with one exponential (tile::kFactorSpan): G = exp(S − r_i)·(w_i + a_i·u_j),
  // a_i = exp(r_i − K), u_j = w_j·exp(K − c_j) (0 where w_j = 0), K = max r_i of these rows.
  if (do_row && do_col && rows > 0 && col_scratch != nullptr) {
    S k_ref = row_shift[0];
    bool ok = true;
    for (int64_t r = 0; r < rows; ++r) {
      k_ref = std::max(k_ref, row_shift[r]);
      ok = ok && std::isfinite(row_weight[r]);
    }
    const S span = static_cast<S>(T_::kFactorSpan);
    for (int64_t j = 0; ok && j < m; ++j) {
      const S cw = col_weight[j];
      ok = cw == S(0) || (std::isfinite(cw) && !(k_ref - col_shift[j] > span));
    }
    if (ok) {
      // u_j = w_j·exp(K − c_j), 0 where w_j = 0 (exp(K − c_j) may overflow there): on lanes.
      const V vk(k_ref), zero(S(0));
      for (int64_t j = 0; j < m; j += w) {
        const int64_t c = std::min<int64_t>(w, m - j);
        const V cw = V::loadu(col_weight + j, c);
        V::blendv(cw * T_::Math<V>::exp(vk - V::loadu(col_shift + j, c)), zero, cw == zero).store(col_scratch + j, c);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const S* s = Sm + r * ld;
        S* g = G + r * ldg;
        const V rs(row_shift[r]);
        const V rw(row_weight[r]);
        const V a(std::exp(std::min(row_shift[r] - k_ref, S(0))));
        int64_t j = 0;
        for (; j < mv; j += w) {
          const V e = T_::Math<V>::exp(V::loadu(s + j) - rs);
          flush_subnormal(e * at::vec::fmadd(a, V::loadu(col_scratch + j), rw)).store(g + j);
        }
        if (j < m) {
          const int64_t c = m - j;
          const V e = T_::Math<V>::exp(V::loadu(s + j, c) - rs);
          flush_subnormal(e * at::vec::fmadd(a, V::loadu(col_scratch + j, c), rw)).store(g + j, c);
        }
      }
      return;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    S* s = Sm + r * ld;
    S* g = G + r * ldg;
    const V rs(do_row ? row_shift[r] : S(0));
    const V rw(do_row ? row_weight[r] : S(0));
    auto term = [&](const V& v, const S* cs, const S* cw, int64_t c) {
      V out(S(0));
      if (do_row) out = T_::softmax_grad_term(v, rs, rw);
      if (do_col) out = out + T_::softmax_grad_term(v, V::loadu(cs, c), V::loadu(cw, c));
      return flush_subnormal(out);
    };
    int64_t j = 0;
    for (; j < mv; j += w)
      term(V::loadu(s + j), do_col ? col_shift + j : nullptr, do_col ? col_weight + j : nullptr, w).store(g + j);
    if (j < m) {
      const int64_t c = m - j;
      term(V::loadu(s + j, c), do_col ? col_shift + j : nullptr, do_col ? col_weight + j : nullptr, c)
          .store(g + j, c);
    }
  }
}

// tile::lse_merge_parts for m columns at once (lanes across columns): part b of column j has
// max maxes[b·stride + j] and sum sums[b·stride + j]; running_max/running_sum (m,) are updated.
template <typename S>
void lse_merge_cols(S* running_max, S* running_sum, const S* maxes, const S* sums, int64_t parts, int64_t stride,
                    int64_t m) {
  using V = Vec<S>;
  constexpr int64_t w = W<S>;
  const V ninf(T_::neg_inf<S>()), zero(S(0)), inf(std::numeric_limits<S>::infinity());
  // lse_part_rescaled on lanes: 0 for an empty part, the sum itself where the part holds the max.
  auto rescaled = [&](const V& sum, const V& pmax, const V& shift) {
    const V r = V::blendv(sum * T_::Math<V>::exp(pmax - shift), sum, pmax == shift);
    return V::blendv(r, zero, pmax == ninf);
  };
  for (int64_t j = 0; j < m; j += w) {
    const int64_t c = std::min<int64_t>(w, m - j);
    const V run_max = V::loadu(running_max + j, c);
    V mx = run_max;
    for (int64_t b = 0; b < parts; ++b) mx = at::vec::maximum(mx, V::loadu(maxes + b * stride + j, c));
    const V shift = V::blendv(zero, mx, mx.abs() < inf);  // finite_or_zero (NaN → 0)
    V total = rescaled(V::loadu(running_sum + j, c), run_max, shift);
    for (int64_t b = 0; b < parts; ++b)
      total = total + rescaled(V::loadu(sums + b * stride + j, c), V::loadu(maxes + b * stride + j, c), shift);
    total.store(running_sum + j, c);
    mx.store(running_max + j, c);
  }
}

// ----------------------------------------------------------------------------- pairwise_sigmoid

template <typename S>
void sigmoid_block(S* Sm, int64_t ld, int64_t rows, int64_t m, int64_t row0, const Marks& marks, S bias,
                   S* row_loss, bool want_grad, const S* row_grad, S* row_gsum, S* sign) {
  using V = Vec<S>;
  constexpr int64_t w = W<S>;
  const V vb(bias);
  for (int64_t r = 0; r < rows; ++r) {
    S* s = Sm + r * ld;
    const int64_t i = row0 + r;
    const S gi = row_grad != nullptr ? row_grad[r] : S(1);
    const V vg(gi);
    V loss(S(0)), gsum(S(0));
    // Columns [j0, j1) with the constant sign `c` (+1 negatives, −1 positives) or the per-column
    // signs in `sign` when use_sign.
    auto segment = [&](int64_t j0, int64_t j1, S c, bool use_sign) {
      int64_t j = j0;
      auto step = [&](int64_t jj, int64_t cnt) {
        const V z = use_sign ? V::loadu(sign + jj, cnt) : V(c);
        const V t = (V::loadu(s + jj, cnt) + vb) * z;
        V sp, sg;
        T_::softplus_sigmoid(t, sp, sg);
        if (cnt < w) {
          sp = V::set(V(S(0)), sp, cnt);
          sg = V::set(V(S(0)), sg, cnt);
        }
        if (row_loss != nullptr) loss = loss + sp;
        if (want_grad) {
          const V gr = flush_subnormal(sg * z * vg);
          if (row_gsum != nullptr) gsum = gsum + gr;
          gr.store(s + jj, cnt);
        }
      };
      for (; j + w <= j1; j += w) step(j, w);
      if (j < j1) step(j, j1 - j);
    };
    if (marks.kind == T_::MARK_DIAGONAL) {
      const int64_t jd = T_::diagonal_column(i, marks.offset, m);
      if (jd < 0) {
        segment(0, m, S(1), false);
      } else {
        segment(0, jd, S(1), false);
        segment(jd, jd + 1, S(-1), false);
        segment(jd + 1, m, S(1), false);
      }
    } else if (marks.kind == T_::MARK_SAME_LABEL) {
      const int64_t li = marks.x_labels[i];
      for (int64_t j = 0; j < m; ++j) sign[j] = T_::label_marked(li, marks.y_labels[j]) ? S(-1) : S(1);
      segment(0, m, S(1), true);
    } else {
      segment(0, m, S(1), false);
    }
    if (row_loss != nullptr) row_loss[r] = hsum(loss);
    if (row_gsum != nullptr) row_gsum[r] = hsum(gsum);
  }
}

// ----------------------------------------------------------------------------- similarity_kl

template <typename S>
void kl_forward(const S* Sm, const S* Tm, int64_t ld, int64_t rows, int64_t m, bool ce, S* row_out,
                int64_t row_stride, S* col_out) {
  using V = Vec<S>;
  constexpr int64_t w = W<S>;
  const S ninf = T_::neg_inf<S>();
  const int64_t mv = m - m % w;
  if (row_out != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      const S* s = Sm + r * ld;
      const S* t = Tm + r * ld;
      V ms(ninf), mt(ninf);
      int64_t j = 0;
      for (; j < mv; j += w) {
        ms = at::vec::maximum(ms, V::loadu(s + j));
        mt = at::vec::maximum(mt, V::loadu(t + j));
      }
      if (j < m) {
        ms = at::vec::maximum(ms, load_tail(s + j, m - j, ninf));
        mt = at::vec::maximum(mt, load_tail(t + j, m - j, ninf));
      }
      const S max_s = hmax_nan(ms), max_t = hmax_nan(mt);
      const V vms(max_s), vmt(max_t);
      V ss(S(0)), st(S(0)), wa(S(0)), en(S(0));
      auto step = [&](int64_t jj, int64_t cnt) {
        V vs = V::loadu(s + jj, cnt), vt = V::loadu(t + jj, cnt);
        V es = T_::Math<V>::exp(vs - vms), et = T_::Math<V>::exp(vt - vmt);
        V wv = et * (vt - vs);
        V ev = ce ? et * (vmt - vt) : V(S(0));
        if (cnt < w) {
          es = V::set(V(S(0)), es, cnt);
          et = V::set(V(S(0)), et, cnt);
          wv = V::set(V(S(0)), wv, cnt);
          ev = V::set(V(S(0)), ev, cnt);
        }
        ss = ss + es;
        st = st + et;
        wa = wa + wv;
        en = en + ev;
      };
      for (j = 0; j < mv; j += w) step(j, w);
      if (j < m) step(j, m - j);
      row_out[0 * row_stride + r] = max_s;
      row_out[1 * row_stride + r] = hsum(ss);
      row_out[2 * row_stride + r] = max_t;
      row_out[3 * row_stride + r] = hsum(st);
      row_out[4 * row_stride + r] = hsum(wa);
      row_out[5 * row_stride + r] = hsum(en);
    }
  }
  if (col_out != nullptr) {
    S* cms = col_out;
    S* css = col_out + m;
    S* cmt = col_out + 2 * m;
    S* cst = col_out + 3 * m;
    S* cwa = col_out + 4 * m;
    S* cen = col_out + 5 * m;
    for (int64_t j = 0; j < m; ++j) {
      cms[j] = ninf;
      cmt[j] = ninf;
      css[j] = cst[j] = cwa[j] = cen[j] = S(0);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const S* s = Sm + r * ld;
      const S* t = Tm + r * ld;
      int64_t j = 0;
      for (; j < mv; j += w) {
        at::vec::maximum(V::loadu(cms + j), V::loadu(s + j)).store(cms + j);
        at::vec::maximum(V::loadu(cmt + j), V::loadu(t + j)).store(cmt + j);
      }
      for (; j < m; ++j) {
        cms[j] = T_::Math<S>::max_nan(cms[j], s[j]);
        cmt[j] = T_::Math<S>::max_nan(cmt[j], t[j]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const S* s = Sm + r * ld;
      const S* t = Tm + r * ld;
      auto step = [&](int64_t jj, int64_t cnt) {
        const V vs = V::loadu(s + jj, cnt), vt = V::loadu(t + jj, cnt);
        const V vmt = V::loadu(cmt + jj, cnt);
        const V et = T_::Math<V>::exp(vt - vmt);
        (V::loadu(css + jj, cnt) + T_::Math<V>::exp(vs - V::loadu(cms + jj, cnt))).store(css + jj, cnt);
        (V::loadu(cst + jj, cnt) + et).store(cst + jj, cnt);
        (V::loadu(cwa + jj, cnt) + et * (vt - vs)).store(cwa + jj, cnt);
        if (ce) (V::loadu(cen + jj, cnt) + et * (vmt - vt)).store(cen + jj, cnt);
      };
      int64_t j = 0;
      for (; j < mv; j += w) step(j, w);
      if (j < m) step(j, m - j);
    }
  }
}

template <typename S>
void kl_backward(S* Sm, const S* Tm, int64_t ld, int64_t rows, int64_t m, const S* rms, const S* rws, const S* rmt,
                 const S* rwt, const S* cms, const S* cws, const S* cmt, const S* cwt) {
  using V = Vec<S>;
  constexpr int64_t w = W<S>;
  const int64_t mv = m - m % w;
  const bool do_row = rws != nullptr;
  const bool do_col = cws != nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    S* s = Sm + r * ld;
    const S* t = Tm + r * ld;
    const V a(do_row ? rms[r] : S(0)), b(do_row ? rws[r] : S(0)), c(do_row ? rmt[r] : S(0)),
        d(do_row ? rwt[r] : S(0));
    auto step = [&](int64_t jj, int64_t cnt) {
      const V vs = V::loadu(s + jj, cnt), vt = V::loadu(t + jj, cnt);
      V out(S(0));
      if (do_row) out = T_::kl_grad_term(vs, vt, a, b, c, d);
      if (do_col)
        out = out + T_::kl_grad_term(vs, vt, V::loadu(cms + jj, cnt), V::loadu(cws + jj, cnt),
                                     V::loadu(cmt + jj, cnt), V::loadu(cwt + jj, cnt));
      flush_subnormal(out).store(s + jj, cnt);
    };
    int64_t j = 0;
    for (; j < mv; j += w) step(j, w);
    if (j < m) step(j, m - j);
  }
}

// ----------------------------------------------------------------------------- operands

template <typename S>
void scale_copy(const S* in, S* out, int64_t n, S mult) {
  using V = Vec<S>;
  constexpr int64_t w = W<S>;
  const V vm(mult);
  int64_t j = 0;
  for (; j + w <= n; j += w) (V::loadu(in + j) * vm).store(out + j);
  if (j < n) (V::loadu(in + j, n - j) * vm).store(out + j, n - j);
}

template <typename S>
Epilogues<S> make_table() {
  Epilogues<S> e;
  e.lse_forward = &lse_forward<S>;
  e.lse_backward = &lse_backward<S>;
  e.lse_merge_cols = &lse_merge_cols<S>;
  e.sigmoid = &sigmoid_block<S>;
  e.kl_forward = &kl_forward<S>;
  e.kl_backward = &kl_backward<S>;
  e.scale_copy = &scale_copy<S>;
  return e;
}

}  // namespace
}  // namespace CPU_CAPABILITY

#define MMLOSS_CAT_(a, b) a##b
#define MMLOSS_CAT(a, b) MMLOSS_CAT_(a, b)

const Epilogues<float>& MMLOSS_CAT(epilogues_f32_, MMLOSS_ISA)() {
  static const Epilogues<float> table = CPU_CAPABILITY::make_table<float>();
  return table;
}

const Epilogues<double>& MMLOSS_CAT(epilogues_f64_, MMLOSS_ISA)() {
  static const Epilogues<double> table = CPU_CAPABILITY::make_table<double>();
  return table;
}

}  // namespace cpu
}  // namespace mmloss
