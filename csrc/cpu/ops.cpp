// The `cpu` backend: the torch backend's algorithm (mmloss/ops/torch_chunked.py, torch_kl.py)
// with one fused, vectorised epilogue per chunk.
//
// Per row chunk of the logit matrix: S = (s·x_c)·yᵀ by the vendor GEMM (at::mm_out into a
// chunk buffer sized like the torch backend's workspace), then ONE parallel region over fixed
// blocks of RB rows runs the epilogue (epilogue_impl.h): marks, row statistics, per-block column
// partials, or the gradient tile G in place. Column partials merge in block order (a fixed
// order: results do not depend on the thread count). Gradients: dx_c = s_c·(G·y),
// dy += Gᵀ·(s·x_c), dscale = ⟨x_i, (G·y)_i⟩, dbias from the statistics (softmax) or the tile
// sums (sigmoid), as the torch backend's FeatureGrads.
//
// Statistics have the torch backend's format (row/col (2, K) = [shift, sum]; KL (4, K) =
// [max_s, sum_s, max_t, sum_t]), so its ring/merge helpers apply. Accumulation is fp32 (fp64 for
// fp64 inputs); fp16/bf16 operands are upcast (y once per call, x per chunk).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "epilogue.h"
#include "mmloss/tile_math.h"

// at::parallel_for is header-only: without -fopenmp (_OPENMP undefined) it runs every epilogue
// region on the calling thread while torch's own ops use all threads (issue 12).
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "mmloss cpu backend built without -fopenmp: at::parallel_for regions run on one thread"
#endif

namespace mmloss {
namespace cpu {

namespace tm = ::mmloss::tile;

namespace {

// Rows per epilogue block: the unit of parallel work and of column partials. Fixed (not derived
// from the thread count) so that results are identical for any number of threads.
constexpr int64_t RB = 32;
// Elements of work below which a parallel region is not worth its barrier.
constexpr int64_t kGrainElems = 32768;

// ----------------------------------------------------------------------------- ISA selection

// The epilogue instruction set: the widest the CPU supports among those built, capped by
// torch's own choice (ATEN_CPU_CAPABILITY, torch.backends.cpu.get_cpu_capability(): a CPU where
// torch avoids AVX-512, e.g. for frequency reasons, is not sent there by mmloss either).
// MMLOSS_CPU_ISA=default|avx2|avx512 forces one (an error if this CPU or build lacks it).
enum class Isa { Default = 0, Avx2 = 1, Avx512 = 2 };

const char* isa_name(Isa isa) {
  return isa == Isa::Avx512 ? "avx512" : (isa == Isa::Avx2 ? "avx2" : "default");
}

Isa detect_isa() {
#ifdef MMLOSS_HAVE_AVX2_EPILOGUES
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const std::string torch_cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512"
  const Isa best = avx512 && torch_cap == "AVX512" ? Isa::Avx512
                   : (avx2 && (torch_cap == "AVX2" || torch_cap == "AVX512") ? Isa::Avx2 : Isa::Default);
  const char* env = std::getenv("MMLOSS_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  const std::string want(env);
  if (want == "default") return Isa::Default;
  if (want == "avx2") {
    TORCH_CHECK(avx2, "MMLOSS_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
    return Isa::Avx2;
  }
  if (want == "avx512") {
    TORCH_CHECK(avx512, "MMLOSS_CPU_ISA=avx512 but this CPU lacks AVX-512 F/BW/VL/DQ");
    return Isa::Avx512;
  }
  TORCH_CHECK_VALUE(false, "MMLOSS_CPU_ISA must be default, avx2 or avx512, got '", want, "'");
#else
  const char* env = std::getenv("MMLOSS_CPU_ISA");
  TORCH_CHECK_VALUE(env == nullptr || env[0] == '\0' || std::string(env) == "default",
                    "MMLOSS_CPU_ISA: only the portable epilogues ('default') are built on this architecture");
  return Isa::Default;
#endif
}

Isa epilogue_isa_in_use() {
  static const Isa value = detect_isa();
  return value;
}

template <typename S>
const Epilogues<S>& epilogues();

template <>
const Epilogues<float>& epilogues<float>() {
  switch (epilogue_isa_in_use()) {
#ifdef MMLOSS_HAVE_AVX2_EPILOGUES
    case Isa::Avx512: return epilogues_f32_avx512();
    case Isa::Avx2: return epilogues_f32_avx2();
#endif
    default: return epilogues_f32_default();
  }
}

template <>
const Epilogues<double>& epilogues<double>() {
  switch (epilogue_isa_in_use()) {
#ifdef MMLOSS_HAVE_AVX2_EPILOGUES
    case Isa::Avx512: return epilogues_f64_avx512();
    case Isa::Avx2: return epilogues_f64_avx2();
#endif
    default: return epilogues_f64_default();
  }
}

// ----------------------------------------------------------------------------- workspace plan

int64_t parse_bytes(const std::string& text) {
  std::string t;
  for (char c : text)
    if (!std::isspace(static_cast<unsigned char>(c))) t.push_back(static_cast<char>(std::tolower(c)));
  static const char* suffixes[] = {"kib", "mib", "gib", "kb", "mb", "gb", "k", "m", "g"};
  for (const char* suf : suffixes) {
    const size_t n = std::strlen(suf);
    if (t.size() > n && t.compare(t.size() - n, n, suf) == 0) {
      const double v = std::stod(t.substr(0, t.size() - n));
      const int shift = suf[0] == 'k' ? 10 : (suf[0] == 'm' ? 20 : 30);
      return static_cast<int64_t>(v * static_cast<double>(int64_t(1) << shift));
    }
  }
  size_t pos = 0;
  const long long v = std::stoll(t, &pos);
  TORCH_CHECK(pos == t.size(), "not a byte count");
  return v;
}

// torch_chunked.workspace_budget for CPU tensors: MMLOSS_CHUNK_BYTES, else half the operands'
// bytes within [1 MiB, 16 MiB].
int64_t workspace_budget(int64_t operand_bytes) {
  const char* env = std::getenv("MMLOSS_CHUNK_BYTES");
  if (env != nullptr && env[0] != '\0') {
    int64_t value = 0;
    try {
      value = parse_bytes(env);
    } catch (...) {
      TORCH_CHECK_VALUE(false, "MMLOSS_CHUNK_BYTES must be a byte count such as 64MiB, got '", env, "'");
    }
    TORCH_CHECK_VALUE(value > 0, "MMLOSS_CHUNK_BYTES must be positive, got '", env, "'");
    return value;
  }
  return std::max<int64_t>(int64_t(1) << 20, std::min<int64_t>(int64_t(16) << 20, operand_bytes / 2));
}

constexpr int64_t kMinChunkRows = 16;

// torch_chunked.chunk_rows: the rows whose M logits and two D-wide temporaries fit the budget
// (less the torch backend's column-block scratch), at least 16; chunk_size > 0 wins.
int64_t chunk_rows(int64_t n, int64_t m, int64_t d, int64_t elem, int64_t chunk_size) {
  if (chunk_size > 0) return std::min(chunk_size, n);
  const int64_t budget = workspace_budget((n + m) * d * elem);
  const int64_t scratch = std::min<int64_t>(int64_t(2) << 20, budget / 8);
  const int64_t rows = (budget - scratch) / ((m + 2 * d) * elem);
  return std::max<int64_t>(1, std::min(n, std::max(kMinChunkRows, rows)));
}

// torch_kl.kl_chunk_rows: four C×M buffers within half the budget.
int64_t kl_chunk_rows(int64_t n, int64_t m, int64_t dims, int64_t elem, int64_t chunk_size) {
  if (chunk_size > 0) return std::min(chunk_size, n);
  const int64_t budget = workspace_budget((n + m) * dims * elem);
  const int64_t rows = budget / (2 * 4 * m * elem);
  return std::max<int64_t>(1, std::min(n, std::max(kMinChunkRows, rows)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The blocks one pass over the (n × m) logit matrix visits: br rows × bc columns, rows outer,
// columns inner, each block written by one GEMM into a contiguous buffer (leading dimension bc).
// chunk_size > 0 sets both edges (as the triton gemm path). Otherwise the strip budget of chunk_rows (rows × (m + 2d)
// elements) is spent on a near-square block when a strip would be thin: the vendor GEMM packs
// its shared operand once per call, so 400-row strips of an 8192-wide matrix ran ~8–20 % slower
// than one GEMM while ~1600² blocks matched it (benchmarks/results/cpu/compiled_backend.md).
struct Tiling {
  int64_t br, bc;
};

Tiling tiling(int64_t n, int64_t m, int64_t d, int64_t elem, int64_t chunk_size) {
  // bc ≥ 1 even when m = 0: the column loops then run once with an empty block, so that rows
  // without any column still get their statistics (−inf LSE) and zero gradients.
  if (chunk_size > 0) return {std::min(chunk_size, n), std::max<int64_t>(1, std::min(chunk_size, m))};
  const int64_t rows = chunk_rows(n, m, d, elem, 0);
  if (rows >= n) return {rows, std::max<int64_t>(1, m)};
  // A side × side block and its two side × d temporaries in the strip's elements.
  const double budget = static_cast<double>(rows) * static_cast<double>(m + 2 * d);
  const int64_t side = std::max<int64_t>(
      kMinChunkRows, static_cast<int64_t>(std::sqrt(static_cast<double>(d) * d + budget)) - d);
  if (side >= m || side <= rows) return {rows, m};
  // Balanced edges: equal column blocks (a multiple of 16 lanes), then equal row blocks.
  const int64_t bc = std::min(m, round_up(ceil_div(m, ceil_div(m, side)), 16));
  const int64_t br_max = std::max<int64_t>(kMinChunkRows, static_cast<int64_t>(budget / static_cast<double>(bc + 2 * d)));
  return {std::min(n, ceil_div(n, ceil_div(n, br_max))), bc};
}

// Contiguous (r, c) view of the front of a flat buffer.
Tensor front(const Tensor& flat, int64_t r, int64_t c) { return flat.narrow(0, 0, r * c).view({r, c}); }

// The marks of the column block [j0, j0 + mc): the same pairs in block-local column indices
// (tile::diagonal_column(i, offset − j0, mc) is i + offset − j0 when that lies in the block).
Marks block_marks(const Marks& mk, int64_t j0) {
  Marks out = mk;
  out.offset = mk.offset - j0;
  if (mk.y_labels != nullptr) out.y_labels = mk.y_labels + j0;
  return out;
}

int64_t block_grain(int64_t m) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, RB * m)); }

// fn(b, r0, rr) for every RB-row block b (rows [r0, r0 + rr)) of a c-row chunk, the blocks in
// parallel. Each block owns its rows and its column-partial slot b, and the partials are merged
// in block order afterwards, so results never depend on the thread count.
template <typename F>
void for_each_row_block(int64_t c, int64_t m, const F& fn) {
  at::parallel_for(0, ceil_div(c, RB), block_grain(m), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * RB;
      fn(b, r0, std::min(RB, c - r0));
    }
  });
}

// ----------------------------------------------------------------------------- arguments

int mark_kind(Str name, const char* arg) {
  if (name == "none") return tm::MARK_NONE;
  if (name == "diagonal") return tm::MARK_DIAGONAL;
  if (name == "same_label") return tm::MARK_SAME_LABEL;
  TORCH_CHECK_VALUE(false, arg, " must be one of ['none', 'diagonal', 'same_label'], got '", std::string(name), "'");
}

at::ScalarType compute_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_features(const char* xn, const Tensor& x, const char* yn, const Tensor& y) {
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2, "mmloss cpu: ", xn, " and ", yn, " must be 2-D, got ",
                    x.sizes(), " and ", y.sizes());
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), "mmloss cpu: ", xn, " ", x.sizes(), " and ", yn, " ", y.sizes(),
                    " must have the same feature dimension");
  TORCH_CHECK_TYPE(x.scalar_type() == y.scalar_type(), "mmloss cpu: ", xn, " and ", yn,
                   " must have the same dtype, got ", x.scalar_type(), " and ", y.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "mmloss cpu: ", xn, " must be floating point, got ",
                   x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "mmloss cpu backend: ", xn, " and ", yn,
              " must be CPU tensors, got ", x.device(), " and ", y.device());
}

// t in dtype dt, contiguous (no op dispatched when it already is).
Tensor as_contiguous(const Tensor& t, at::ScalarType dt) {
  if (t.scalar_type() == dt && t.is_contiguous()) return t;
  return t.to(dt).contiguous();
}

// One side of a logit matrix L = s·x·yᵀ (+ bias): operands in the compute dtype, the scale.
template <typename S>
struct Side {
  Tensor x;        // (N, D) as given
  Tensor y;        // (M, D) in the compute dtype (any strides)
  Tensor scale_t;  // the scale tensor as given (for the dscale dtype), undefined for a float
  Tensor scale_rows;  // (N,) per-row scale in the compute dtype, or undefined
  S scale = S(1);
  at::ScalarType cdt;
  int64_t n, m, d;

  Side(const Tensor& x_, const Tensor& y_, const OptTensor& scale_opt, double scale_value)
      : x(x_), cdt(compute_dtype(x_)), n(x_.size(0)), m(y_.size(0)), d(x_.size(1)) {
    y = y_.scalar_type() == cdt ? y_ : y_.to(cdt);
    if (scale_opt.has_value() && scale_opt->defined()) {
      scale_t = *scale_opt;
      TORCH_CHECK_VALUE(scale_t.dim() == 0 || (scale_t.dim() == 1 && scale_t.size(0) == n),
                        "mmloss cpu: scale must be 0-d or (N,) = (", n, ",), got ", scale_t.sizes());
      if (scale_t.dim() == 1) {
        scale_rows = as_contiguous(scale_t, cdt);
      } else {
        scale = static_cast<S>(scale_t.item<double>());
      }
    } else {
      scale = static_cast<S>(scale_value);
    }
  }

  bool per_row() const { return scale_rows.defined(); }

  S scale_of(int64_t i) const { return per_row() ? scale_rows.data_ptr<S>()[i] : scale; }

  // Rows [i0, i1) of x in the compute dtype times `mult` (the row scale, or 1), into out
  // (c × D, contiguous). fp32 arithmetic as torch's x.to(cdt) * s.
  template <typename In>
  void rows_into(const In* base, int64_t i0, int64_t i1, S* out, bool scaled) const {
    const int64_t s0 = x.stride(0), s1 = x.stride(1);
    if constexpr (std::is_same_v<In, S>) {
      if (s1 == 1) {
        // Same dtype, unit column stride: the vectorised product (same values as the loop below).
        const auto scale_copy = epilogues<S>().scale_copy;
        const S* sr = per_row() ? scale_rows.data_ptr<S>() : nullptr;
        for (int64_t i = i0; i < i1; ++i)
          scale_copy(base + i * s0, out + (i - i0) * d, d, scaled ? (sr ? sr[i] : scale) : S(1));
        return;
      }
    }
    for (int64_t i = i0; i < i1; ++i) {
      const In* row = base + i * s0;
      S* o = out + (i - i0) * d;
      const S mult = scaled ? scale_of(i) : S(1);
      if (s1 == 1) {
        for (int64_t k = 0; k < d; ++k) o[k] = static_cast<S>(row[k]) * mult;
      } else {
        for (int64_t k = 0; k < d; ++k) o[k] = static_cast<S>(row[k * s1]) * mult;
      }
    }
  }

  void x_rows(int64_t i0, int64_t i1, S* out, bool scaled) const {
    switch (x.scalar_type()) {
      case at::kFloat: return rows_into(x.data_ptr<float>(), i0, i1, out, scaled);
      case at::kDouble: return rows_into(x.data_ptr<double>(), i0, i1, out, scaled);
      case at::kHalf: return rows_into(x.data_ptr<at::Half>(), i0, i1, out, scaled);
      case at::kBFloat16: return rows_into(x.data_ptr<at::BFloat16>(), i0, i1, out, scaled);
      default: TORCH_CHECK_TYPE(false, "mmloss cpu: unsupported feature dtype ", x.scalar_type());
    }
  }

  // s·x for rows [i0, i1) in the compute dtype, written to out (c, D) (contiguous).
  void scaled_x(int64_t i0, int64_t i1, Tensor& out) const { x_rows(i0, i1, out.data_ptr<S>(), true); }

  // Multiply rows [i0, i1) of a contiguous (c, D) tensor by their scale in place.
  void scale_rows_of(Tensor& a, int64_t i0, int64_t i1) const {
    S* p = a.data_ptr<S>();
    const auto scale_copy = epilogues<S>().scale_copy;
    const S* sr = per_row() ? scale_rows.data_ptr<S>() : nullptr;
    for (int64_t i = i0; i < i1; ++i) {
      S* row = p + (i - i0) * d;
      scale_copy(row, row, d, sr ? sr[i] : scale);
    }
  }
};

// Labels as int64 (int32 labels are widened once per call), and the mark description.
struct MarkHolder {
  Tensor xl, yl;
  Marks marks{tm::MARK_NONE, 0, nullptr, nullptr};

  MarkHolder(int kind, int64_t offset, const OptTensor& x_labels, const OptTensor& y_labels, int64_t n, int64_t m) {
    marks.kind = kind;
    marks.offset = offset;
    if (kind == tm::MARK_SAME_LABEL) {
      TORCH_CHECK_VALUE(x_labels.has_value() && y_labels.has_value() && x_labels->defined() && y_labels->defined(),
                        "mmloss cpu: marks 'same_label' need x_labels and y_labels");
      xl = x_labels->to(at::kLong).contiguous();
      yl = y_labels->to(at::kLong).contiguous();
      TORCH_CHECK_VALUE(xl.dim() == 1 && xl.size(0) == n && yl.dim() == 1 && yl.size(0) == m,
                        "mmloss cpu: labels must be (N,) and (M,) = (", n, ",) and (", m, ",), got ", xl.sizes(),
                        " and ", yl.sizes());
      marks.x_labels = xl.data_ptr<int64_t>();
      marks.y_labels = yl.data_ptr<int64_t>();
    }
  }
};

Tensor empty_1d(const Tensor& like, at::ScalarType dt) { return at::empty({0}, like.options().dtype(dt)); }

Tensor empty_like_x(const Tensor& x) { return at::empty({0}, x.options()); }

template <typename S>
S scalar_of(const OptTensor& t, double value) {
  if (t.has_value() && t->defined()) return static_cast<S>(t->item<double>());
  return static_cast<S>(value);
}

// dx, dy, dscale from logit-gradient chunks (torch_chunked.FeatureGrads).
template <typename S>
struct FeatureGrads {
  const Side<S>& side;
  bool need_x, need_y, need_scale;
  bool keep_cdt;
  Tensor dx, dy, dscale_rows, a_buf;

  bool dy_started = false;
  Tensor xbuf;  // (rows, D) x rows in the compute dtype, for dscale

  FeatureGrads(const Side<S>& s, int64_t rows, bool nx, bool ny, bool ns, bool keep)
      : side(s), need_x(nx), need_y(ny), need_scale(ns), keep_cdt(keep) {
    const auto opts = s.x.options().dtype(s.cdt);
    if (need_x) dx = at::empty(s.x.sizes(), keep ? opts : s.x.options());
    if (need_y) dy = at::empty({s.m, s.d}, opts);
    if (need_scale) dscale_rows = at::empty({s.n}, opts);
    if ((need_x || need_scale) && !(need_x && dx.scalar_type() == s.cdt && dx.is_contiguous()))
      a_buf = at::empty({rows, s.d}, opts);
    if (need_scale) xbuf = at::empty({rows, s.d}, opts);
  }

  // The (c, D) accumulator of G·y for rows [i0, i1): dx's rows themselves when dx is in the
  // compute dtype and contiguous, else the front of a_buf.
  Tensor rows_acc(int64_t i0, int64_t i1, int64_t c) const {
    if (!a_buf.defined()) return dx.slice(0, i0, i1);
    return c == a_buf.size(0) ? a_buf : a_buf.slice(0, 0, c);
  }

  // The gradient block grad (c × mc, contiguous) of rows [i0, i1) and columns [j0, j0 + mc);
  // sx: s·x for those rows (needed for dy). Blocks come rows outer, columns inner (j0 = 0 first
  // in each row chunk, i0 = 0 first in each column block); finish_rows(i0, i1) after the last
  // column block of a row chunk.
  void add_block(int64_t i0, int64_t i1, int64_t j0, const Tensor& grad, const Tensor& sx) {
    const int64_t c = i1 - i0, mc = grad.size(1);
    if (need_x || need_scale) {
      // a = G·y for these rows, summed over the column blocks.
      Tensor a = rows_acc(i0, i1, c);
      const Tensor yb = mc == side.m ? side.y : side.y.narrow(0, j0, mc);
      if (j0 == 0) {
        at::mm_out(a, grad, yb);
      } else {
        a.addmm_(grad, yb);
      }
    }
    if (need_y) {
      Tensor dyb = mc == side.m ? dy : dy.narrow(0, j0, mc);
      if (i0 == 0) {
        at::mm_out(dyb, grad.t(), sx);
      } else {
        dyb.addmm_(grad.t(), sx);
      }
      dy_started = true;
    }
  }

  void finish_rows(int64_t i0, int64_t i1) {
    if (!(need_x || need_scale)) return;
    const int64_t c = i1 - i0, d = side.d;
    Tensor a = rows_acc(i0, i1, c);
    const S* ap = a.data_ptr<S>();
    if (need_scale) {
      // ⟨x_i, (G·y)_i⟩: no division by s, so s = 0 works.
      S* xr = xbuf.data_ptr<S>();
      side.x_rows(i0, i1, xr, false);
      S* out = dscale_rows.data_ptr<S>() + i0;
      for (int64_t r = 0; r < c; ++r) {
        S acc = 0;
        for (int64_t k = 0; k < d; ++k) acc += xr[r * d + k] * ap[r * d + k];
        out[r] = acc;
      }
    }
    if (need_x) {
      side.scale_rows_of(a, i0, i1);
      if (a_buf.defined()) dx.slice(0, i0, i1).copy_(a);
    }
  }

  // A whole-row chunk (c × M).
  void add_chunk(int64_t i0, int64_t i1, const Tensor& grad, const Tensor& sx) {
    add_block(i0, i1, 0, grad, sx);
    finish_rows(i0, i1);
  }

  // (dx, dy, dscale) in the inputs' dtypes (or the compute dtype when keep_cdt).
  std::tuple<Tensor, Tensor, Tensor> finish() {
    if (need_y && !dy_started) dy.zero_();
    Tensor dscale;
    if (need_scale) dscale = side.per_row() ? dscale_rows : dscale_rows.sum();
    if (!keep_cdt) {
      if (dy.defined() && dy.scalar_type() != side.x.scalar_type()) dy = dy.to(side.x.scalar_type());
      if (dscale.defined() && side.scale_t.defined() && dscale.scalar_type() != side.scale_t.scalar_type())
        dscale = dscale.to(side.scale_t.scalar_type());
    }
    return {dx, dy, dscale};
  }
};

Tensor or_empty(const Tensor& t, const Tensor& x) { return t.defined() ? t : empty_like_x(x); }

// ----------------------------------------------------------------------------- similarity_lse

template <typename S>
Tensor5 lse_forward_impl(const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
                         const OptTensor& bias, double bias_value, int kind, int64_t offset,
                         const OptTensor& x_labels, const OptTensor& y_labels, bool rows, bool cols,
                         int64_t chunk_size, int64_t logit_budget) {
  Side<S> side(x, y, scale, scale_value);
  const int64_t n = side.n, m = side.m, d = side.d;
  const auto cdt = side.cdt;
  const auto opts = x.options().dtype(cdt);
  MarkHolder mh(kind, offset, x_labels, y_labels, n, m);
  const S bias_v = scalar_of<S>(bias, bias_value);
  const Epilogues<S>& ep = epilogues<S>();

  // _spec.keeps_logits: 0 < N·M·elem ≤ budget (elem 8 for fp64, else 4).
  const int64_t logit_bytes = n * m * static_cast<int64_t>(sizeof(S));
  const bool keep = logit_budget > 0 && logit_bytes > 0 && logit_bytes <= logit_budget;
  const Tiling tl = tiling(n, m, d, sizeof(S), chunk_size);
  const int64_t BR = tl.br, BC = tl.bc;
  const int64_t nb_max = ceil_div(std::max<int64_t>(BR, 1), RB);
  Tensor logits = keep ? at::empty({n, m}, opts) : empty_1d(x, cdt);
  Tensor buf = keep ? Tensor() : at::empty({BR * BC}, opts);
  Tensor sx = at::empty({BR, d}, opts);
  Tensor row_stats = rows ? at::empty({2, n}, opts) : at::empty({2, 0}, opts);
  // Row records of one column block, merged into row_stats when the rows span several blocks.
  Tensor row_part = rows && BC < m ? at::empty({2, BR}, opts) : Tensor();
  // Column scratch: block partials (nb_max × [max, sum, shift] × BC) and the running max and sum.
  Tensor col_ws = cols ? at::empty({nb_max * 3 * BC + 2 * m}, opts) : Tensor();
  S* rshift = rows ? row_stats.data_ptr<S>() : nullptr;
  S* rsum = rows ? row_stats.data_ptr<S>() + n : nullptr;
  S* part = cols ? col_ws.data_ptr<S>() : nullptr;
  S* cmax = cols ? part + nb_max * 3 * BC : nullptr;
  S* csum = cols ? cmax + m : nullptr;
  for (int64_t j = 0; cols && j < m; ++j) cmax[j] = tm::neg_inf<S>(), csum[j] = S(0);

  for (int64_t i0 = 0; i0 < n; i0 += BR) {
    const int64_t i1 = std::min(n, i0 + BR), c = i1 - i0;
    Tensor sxc = c == BR ? sx : sx.slice(0, 0, c);
    side.scaled_x(i0, i1, sxc);
    for (int64_t j0 = 0; j0 == 0 || j0 < m; j0 += BC) {  // once when m = 0: empty rows
      const int64_t mc = std::min(BC, m - j0);
      // Kept logits: the block in place inside the (n, m) matrix (leading dimension m).
      Tensor chunk = keep ? logits.narrow(0, i0, c).narrow(1, j0, mc) : front(buf, c, mc);
      const int64_t ld = keep ? m : mc;
      at::mm_out(chunk, sxc, mc == m ? side.y.t() : side.y.narrow(0, j0, mc).t());
      S* sp = chunk.data_ptr<S>();
      const Marks bm = block_marks(mh.marks, j0);
      // The first column block writes the row records in place; later ones into row_part.
      S* rs_out = !rows ? nullptr : (j0 == 0 ? rshift + i0 : row_part.data_ptr<S>());
      S* rsum_out = !rows ? nullptr : (j0 == 0 ? rsum + i0 : row_part.data_ptr<S>() + BR);
      const int64_t nb = ceil_div(c, RB);
      for_each_row_block(c, mc, [&](int64_t b, int64_t r0, int64_t rr) {
        S* pb = cols ? part + b * 3 * BC : nullptr;
        ep.lse_forward(sp + r0 * ld, ld, rr, mc, i0 + r0, bm, true, rows ? rs_out + r0 : nullptr,
                       rows ? rsum_out + r0 : nullptr, pb, cols ? pb + BC : nullptr, cols ? pb + 2 * BC : nullptr);
      });
      if (rows && j0 > 0) {
        // Disjoint column sets of the same rows: tile::lse_merge (column-block order).
        for (int64_t r = 0; r < c; ++r) {
          const tm::LseStats<S> merged =
              tm::lse_merge(tm::LseStats<S>{rshift[i0 + r], rsum[i0 + r]}, tm::LseStats<S>{rs_out[r], rsum_out[r]});
          rshift[i0 + r] = merged.shift, rsum[i0 + r] = merged.sum;
        }
      }
      if (cols) {
        // Merge the block partials into the running column statistics, in block order.
        at::parallel_for(0, mc, kGrainElems / std::max<int64_t>(1, nb), [&](int64_t j0b, int64_t j1b) {
          ep.lse_merge_cols(cmax + j0 + j0b, csum + j0 + j0b, part + j0b, part + BC + j0b, nb, 3 * BC, j1b - j0b);
        });
      }
    }
  }

  Tensor row_lse, col_lse, col_stats;
  if (!cols) col_lse = empty_1d(x, cdt), col_stats = at::empty({2, 0}, opts);
  if (!rows) row_lse = empty_1d(x, cdt);
  if (rows) {
    row_lse = at::empty({n}, opts);
    S* out = row_lse.data_ptr<S>();
    for (int64_t i = 0; i < n; ++i) out[i] = tm::lse_value(rshift[i], rsum[i], bias_v);
  }
  if (cols) {
    col_stats = at::empty({2, m}, opts);
    col_lse = at::empty({m}, opts);
    S* st = col_stats.data_ptr<S>();
    S* out = col_lse.data_ptr<S>();
    for (int64_t j = 0; j < m; ++j) {
      st[j] = tm::finite_or_zero(cmax[j]);
      st[m + j] = csum[j];
      out[j] = tm::lse_value(st[j], csum[j], bias_v);
    }
  }
  return {row_lse, col_lse, row_stats, col_stats, logits};
}

// (shift, weight) per row/column from a (2, K) record and the upstream gradient; the bias
// gradient's share (Σ allowed grads) is added to *dbias.
template <typename S>
void softmax_weights(const Tensor& grad, const Tensor& stats, int64_t k, Tensor& shift, Tensor& weight, double* dbias) {
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == k,
                    "mmloss cpu: statistics must be (2, ", k, "), got ", stats.sizes());
  TORCH_CHECK_VALUE(grad.numel() == k, "mmloss cpu: upstream gradient must have ", k, " elements, got ",
                    grad.sizes());
  Tensor st = as_contiguous(stats, weight.scalar_type());
  Tensor g = as_contiguous(grad.dim() == 1 ? grad : grad.reshape({k}), weight.scalar_type());
  shift = st;  // keeps the record alive; the shifts are its first row
  const S* sum = st.data_ptr<S>() + k;
  const S* gp = g.data_ptr<S>();
  S* w = weight.data_ptr<S>();
  double acc = 0;
  for (int64_t i = 0; i < k; ++i) {
    w[i] = tm::probability_weight(gp[i], sum[i]);
    acc += static_cast<double>(tm::allowed_grad(gp[i], sum[i]));
  }
  *dbias += acc;
}

template <typename S>
Tensor4 lse_backward_impl(const OptTensor& grad_row, const OptTensor& grad_col, const Tensor& x, const Tensor& y,
                          const OptTensor& scale, double scale_value, const OptTensor& bias, int kind,
                          int64_t offset, const OptTensor& x_labels, const OptTensor& y_labels, bool rows, bool cols,
                          int64_t chunk_size, const Tensor& row_stats, const Tensor& col_stats, const Tensor& logits,
                          bool need_x, bool need_y, bool need_scale, bool need_bias) {
  const bool has_g = rows && grad_row.has_value() && grad_row->defined();
  const bool has_h = cols && grad_col.has_value() && grad_col->defined();
  if (!has_g && !has_h) return {empty_like_x(x), empty_like_x(x), empty_like_x(x), empty_like_x(x)};
  Side<S> side(x, y, scale, scale_value);
  const int64_t n = side.n, m = side.m, d = side.d;
  const auto opts = x.options().dtype(side.cdt);
  MarkHolder mh(kind, offset, x_labels, y_labels, n, m);
  const Epilogues<S>& ep = epilogues<S>();

  double dbias_acc = 0;
  Tensor r_shift, r_w, c_shift, c_w;
  if (has_g) {
    r_w = at::empty({n}, opts);
    softmax_weights<S>(*grad_row, row_stats, n, r_shift, r_w, &dbias_acc);
  }
  if (has_h) {
    c_w = at::empty({m}, opts);
    softmax_weights<S>(*grad_col, col_stats, m, c_shift, c_w, &dbias_acc);
  }
  const bool keep = logits.defined() && logits.dim() == 2;
  if (keep) {
    TORCH_CHECK_VALUE(logits.size(0) == n && logits.size(1) == m && logits.scalar_type() == side.cdt,
                      "mmloss cpu: kept logits must be (", n, ", ", m, ") ", side.cdt, ", got ", logits.sizes(), " ",
                      logits.scalar_type());
  }
  Tensor kept = keep ? as_contiguous(logits, side.cdt) : Tensor();
  const Tiling tl = tiling(n, m, d, sizeof(S), chunk_size);
  const int64_t BR = tl.br, BC = tl.bc;
  Tensor buf = at::empty({BR * BC}, opts);
  Tensor sx = at::empty({BR, d}, opts);
  FeatureGrads<S> fg(side, BR, need_x, need_y, need_scale, false);
  const bool any_feature = need_x || need_y || need_scale;
  // Per-row-block column factors of the one-exponential form (both directions only).
  Tensor scratch = has_g && has_h ? at::empty({ceil_div(std::max<int64_t>(BR, 1), RB) * BC}, opts) : Tensor();
  S* scratch_p = scratch.defined() ? scratch.data_ptr<S>() : nullptr;
  const S* rs = has_g ? r_shift.data_ptr<S>() : nullptr;
  const S* rw = has_g ? r_w.data_ptr<S>() : nullptr;
  const S* cs = has_h ? c_shift.data_ptr<S>() : nullptr;
  const S* cw = has_h ? c_w.data_ptr<S>() : nullptr;

  for (int64_t i0 = 0; any_feature && i0 < n; i0 += BR) {
    const int64_t i1 = std::min(n, i0 + BR), c = i1 - i0;
    Tensor sxc = c == BR ? sx : sx.slice(0, 0, c);
    side.scaled_x(i0, i1, sxc);
    for (int64_t j0 = 0; j0 == 0 || j0 < m; j0 += BC) {  // once when m = 0: empty rows
      const int64_t mc = std::min(BC, m - j0);
      Tensor g = front(buf, c, mc);
      S* src;
      const int64_t ld = keep ? m : mc;
      if (keep) {
        src = kept.data_ptr<S>() + i0 * m + j0;
      } else {
        at::mm_out(g, sxc, mc == m ? side.y.t() : side.y.narrow(0, j0, mc).t());
        src = g.data_ptr<S>();
      }
      S* gp = g.data_ptr<S>();
      const Marks bm = block_marks(mh.marks, j0);
      for_each_row_block(c, mc, [&](int64_t b, int64_t r0, int64_t rr) {
        ep.lse_backward(src + r0 * ld, ld, gp + r0 * mc, mc, rr, mc, i0 + r0, bm, !keep,
                        rs ? rs + i0 + r0 : nullptr, rw ? rw + i0 + r0 : nullptr, cs ? cs + j0 : nullptr,
                        cw ? cw + j0 : nullptr, scratch_p ? scratch_p + b * BC : nullptr);
      });
      fg.add_block(i0, i1, j0, g, sxc);
    }
    fg.finish_rows(i0, i1);
  }
  auto [dx, dy, dscale] = fg.finish();
  Tensor dbias;
  if (need_bias) {
    dbias = at::scalar_tensor(dbias_acc, opts);
    if (bias.has_value() && bias->defined()) dbias = dbias.to(bias->scalar_type());
  }
  return {or_empty(dx, x), or_empty(dy, x), or_empty(dscale, x), or_empty(dbias, x)};
}

// ----------------------------------------------------------------------------- pairwise_sigmoid

// mode: 0 forward (row sums), 1 backward (gradients of ⟨grad, rows⟩), 2 sum (total + gradients).
template <typename S>
Tensor5 sigmoid_impl(int mode, const OptTensor& grad_rows, const Tensor& x, const Tensor& y, const OptTensor& scale,
                     double scale_value, const OptTensor& bias, double bias_value, int kind, int64_t offset,
                     const OptTensor& x_labels, const OptTensor& y_labels, int64_t chunk_size, bool need_x,
                     bool need_y, bool need_scale, bool need_bias) {
  Side<S> side(x, y, scale, scale_value);
  const int64_t n = side.n, m = side.m, d = side.d;
  const auto opts = x.options().dtype(side.cdt);
  MarkHolder mh(kind, offset, x_labels, y_labels, n, m);
  const S bias_v = scalar_of<S>(bias, bias_value);
  const Epilogues<S>& ep = epilogues<S>();
  const bool want_grad = mode == 1 || (mode == 2 && (need_x || need_y || need_scale || need_bias));
  const bool any_feature = need_x || need_y || need_scale;

  Tensor g;
  if (mode == 1) {
    if (!grad_rows.has_value() || !grad_rows->defined())
      return {empty_like_x(x), empty_like_x(x), empty_like_x(x), empty_like_x(x), Tensor()};
    TORCH_CHECK_VALUE(grad_rows->numel() == n, "mmloss cpu: grad_rows must have ", n, " elements, got ",
                      grad_rows->sizes());
    g = as_contiguous(grad_rows->dim() == 1 ? *grad_rows : grad_rows->reshape({n}), side.cdt);
  }
  const bool row_loss = mode != 1;
  Tensor loss = row_loss ? at::empty({n}, opts) : Tensor();
  Tensor gsum = (want_grad && need_bias) ? at::empty({n}, opts) : Tensor();
  const Tiling tl = tiling(n, m, d, sizeof(S), chunk_size);
  const int64_t BR = tl.br, BC = tl.bc;
  const int64_t nb_max = ceil_div(std::max<int64_t>(BR, 1), RB);
  Tensor buf = at::empty({BR * BC}, opts);
  Tensor sx = at::empty({BR, d}, opts);
  Tensor sign = kind == tm::MARK_SAME_LABEL ? at::empty({nb_max, BC}, opts) : Tensor();
  // Row sums of one column block, added to loss/gsum when the rows span several blocks.
  Tensor row_part = BC < m ? at::empty({2, BR}, opts) : Tensor();
  S* sign_p = sign.defined() ? sign.data_ptr<S>() : nullptr;
  S* loss_p = row_loss ? loss.data_ptr<S>() : nullptr;
  S* gsum_p = gsum.defined() ? gsum.data_ptr<S>() : nullptr;
  const S* g_p = g.defined() ? g.data_ptr<S>() : nullptr;
  std::optional<FeatureGrads<S>> fg;
  if (want_grad) fg.emplace(side, BR, need_x, need_y, need_scale, mode == 2);

  if (!(mode == 1 && !any_feature && !need_bias)) {
    for (int64_t i0 = 0; i0 < n; i0 += BR) {
      const int64_t i1 = std::min(n, i0 + BR), c = i1 - i0;
      Tensor sxc = c == BR ? sx : sx.slice(0, 0, c);
      side.scaled_x(i0, i1, sxc);
      for (int64_t j0 = 0; j0 == 0 || j0 < m; j0 += BC) {  // once when m = 0: empty rows
        const int64_t mc = std::min(BC, m - j0);
        Tensor t = front(buf, c, mc);
        at::mm_out(t, sxc, mc == m ? side.y.t() : side.y.narrow(0, j0, mc).t());
        S* tp = t.data_ptr<S>();
        const Marks bm = block_marks(mh.marks, j0);
        // The first column block writes the row sums in place; later ones into row_part.
        S* loss_out = !loss_p ? nullptr : (j0 == 0 ? loss_p + i0 : row_part.data_ptr<S>());
        S* gsum_out = !gsum_p ? nullptr : (j0 == 0 ? gsum_p + i0 : row_part.data_ptr<S>() + BR);
        for_each_row_block(c, mc, [&](int64_t b, int64_t r0, int64_t rr) {
          ep.sigmoid(tp + r0 * mc, mc, rr, mc, i0 + r0, bm, bias_v, loss_out ? loss_out + r0 : nullptr, want_grad,
                     g_p ? g_p + i0 + r0 : nullptr, gsum_out ? gsum_out + r0 : nullptr,
                     sign_p ? sign_p + b * BC : nullptr);
        });
        if (j0 > 0) {
          for (int64_t r = 0; r < c; ++r) {
            if (loss_out) loss_p[i0 + r] += loss_out[r];
            if (gsum_out) gsum_p[i0 + r] += gsum_out[r];
          }
        }
        if (want_grad && any_feature) fg->add_block(i0, i1, j0, t, sxc);
      }
      if (want_grad && any_feature) fg->finish_rows(i0, i1);
    }
  }
  Tensor dx, dy, dscale, dbias;
  if (want_grad) std::tie(dx, dy, dscale) = fg->finish();
  if (want_grad && need_bias) {
    double acc = 0;
    for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(gsum_p[i]);
    dbias = at::scalar_tensor(acc, opts);
    if (mode == 1 && bias.has_value() && bias->defined()) dbias = dbias.to(bias->scalar_type());
  }
  Tensor first;
  if (mode == 0) {
    first = loss;
  } else if (mode == 2) {
    double acc = 0;
    for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(loss_p[i]);
    first = at::scalar_tensor(acc, opts);
  }
  return {or_empty(dx, x), or_empty(dy, x), or_empty(dscale, x), or_empty(dbias, x), first};
}

// ----------------------------------------------------------------------------- similarity_kl

// The student and teacher logit chunks of rows [i0, i1): s·x rows in the compute dtype and
// one GEMM each, in buffers of C rows (the forward and the backward share this step).
template <typename S>
struct KlChunks {
  const Side<S>& st;
  const Side<S>& tt;
  Tensor bs, bt, sxs, sxt;
  Tensor s, t, a;  // the current chunk: student logits, teacher logits, s·x_s rows

  KlChunks(const Side<S>& st_, const Side<S>& tt_, int64_t C, const at::TensorOptions& opts)
      : st(st_), tt(tt_), bs(at::empty({C, st_.m}, opts)), bt(at::empty({C, st_.m}, opts)),
        sxs(at::empty({C, st_.d}, opts)), sxt(at::empty({C, tt_.d}, opts)) {}

  void compute(int64_t i0, int64_t i1) {
    const int64_t c = i1 - i0;
    s = bs.slice(0, 0, c), t = bt.slice(0, 0, c), a = sxs.slice(0, 0, c);
    Tensor b = sxt.slice(0, 0, c);
    st.scaled_x(i0, i1, a);
    tt.scaled_x(i0, i1, b);
    at::mm_out(s, a, st.y.t());
    at::mm_out(t, b, tt.y.t());
  }
};

template <typename S>
Tensor4 kl_forward_impl(const Tensor& x_s, const Tensor& y_s, const Tensor& x_t, const Tensor& y_t,
                        const OptTensor& scale_s, double scale_s_value, const OptTensor& scale_t,
                        double scale_t_value, bool rows, bool cols, bool ce, int64_t chunk_size) {
  Side<S> st(x_s, y_s, scale_s, scale_s_value);
  Side<S> tt(x_t, y_t, scale_t, scale_t_value);
  const int64_t n = st.n, m = st.m;
  const auto opts = x_s.options().dtype(st.cdt);
  const Epilogues<S>& ep = epilogues<S>();
  const int64_t C = kl_chunk_rows(n, m, st.d + tt.d, sizeof(S), chunk_size);
  const int64_t nb_max = ceil_div(std::max<int64_t>(C, 1), RB);
  KlChunks<S> chunks(st, tt, C, opts);
  Tensor row_raw = rows ? at::empty({6, n}, opts) : Tensor();
  Tensor partials, run;
  if (cols) {
    partials = at::empty({nb_max, 6, m}, opts);
    run = at::empty({6, m}, opts);
    S* r = run.data_ptr<S>();
    for (int64_t j = 0; j < m; ++j) {
      const tm::KlStats<S> e = tm::kl_empty<S>();
      r[j] = e.max_s, r[m + j] = e.sum_s, r[2 * m + j] = e.max_t, r[3 * m + j] = e.sum_t;
      r[4 * m + j] = e.weighted, r[5 * m + j] = e.entropy;
    }
  }
  S* rr_p = rows ? row_raw.data_ptr<S>() : nullptr;
  S* part = cols ? partials.data_ptr<S>() : nullptr;
  S* run_p = cols ? run.data_ptr<S>() : nullptr;
  for (int64_t i0 = 0; i0 < n; i0 += C) {
    const int64_t i1 = std::min(n, i0 + C), c = i1 - i0;
    chunks.compute(i0, i1);
    const S* sp = chunks.s.template data_ptr<S>();
    const S* tp = chunks.t.template data_ptr<S>();
    const int64_t nb = ceil_div(c, RB);
    for_each_row_block(c, m, [&](int64_t b, int64_t r0, int64_t rr) {
      ep.kl_forward(sp + r0 * m, tp + r0 * m, m, rr, m, ce, rows ? rr_p + i0 + r0 : nullptr, n,
                    cols ? part + b * 6 * m : nullptr);
    });
    if (cols) {
      at::parallel_for(0, m, kGrainElems / std::max<int64_t>(1, nb), [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          tm::KlStats<S> acc{run_p[j], run_p[m + j], run_p[2 * m + j], run_p[3 * m + j], run_p[4 * m + j],
                             run_p[5 * m + j]};
          for (int64_t bb = 0; bb < nb; ++bb) {
            const S* p = part + bb * 6 * m;
            acc = tm::kl_merge(acc, tm::KlStats<S>{p[j], p[m + j], p[2 * m + j], p[3 * m + j], p[4 * m + j],
                                                   p[5 * m + j]});
          }
          run_p[j] = acc.max_s, run_p[m + j] = acc.sum_s, run_p[2 * m + j] = acc.max_t;
          run_p[3 * m + j] = acc.sum_t, run_p[4 * m + j] = acc.weighted, run_p[5 * m + j] = acc.entropy;
        }
      });
    }
  }
  // (6, K) raw statistics → the divergence and the (4, K) saved record.
  auto finish = [&](const S* raw, int64_t k, Tensor& out, Tensor& stats) {
    out = at::empty({k}, opts);
    stats = at::empty({4, k}, opts);
    S* o = out.data_ptr<S>();
    S* sp = stats.data_ptr<S>();
    for (int64_t i = 0; i < k; ++i) {
      const S max_s = raw[i], sum_s = raw[k + i], max_t = raw[2 * k + i], sum_t = raw[3 * k + i];
      const S lse_s = tm::Math<S>::log(sum_s) + max_s;
      const S lse_t = tm::Math<S>::log(sum_t) + max_t;
      o[i] = tm::kl_divergence(raw[4 * k + i], sum_t, lse_s, lse_t, raw[5 * k + i], ce);
      sp[i] = max_s, sp[k + i] = sum_s, sp[2 * k + i] = max_t, sp[3 * k + i] = sum_t;
    }
  };
  Tensor row = empty_1d(x_s, st.cdt), col = empty_1d(x_s, st.cdt);
  Tensor row_stats = at::empty({4, 0}, opts), col_stats = at::empty({4, 0}, opts);
  if (rows) finish(rr_p, n, row, row_stats);
  if (cols) finish(run_p, m, col, col_stats);
  return {row, col, row_stats, col_stats};
}

// (max_s, w_s, max_t, w_t) per row/column from a (4, K) record and the upstream gradient.
template <typename S>
Tensor kl_weights(const Tensor& grad, const Tensor& stats, int64_t k, const at::TensorOptions& opts) {
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == 4 && stats.size(1) == k,
                    "mmloss cpu: similarity_kl statistics must be (4, ", k, "), got ", stats.sizes());
  TORCH_CHECK_VALUE(grad.numel() == k, "mmloss cpu: upstream gradient must have ", k, " elements, got ",
                    grad.sizes());
  const auto dt = c10::typeMetaToScalarType(opts.dtype());
  Tensor st = as_contiguous(stats, dt);
  Tensor g = as_contiguous(grad.dim() == 1 ? grad : grad.reshape({k}), dt);
  Tensor out = at::empty({4, k}, opts);
  const S* sp = st.data_ptr<S>();
  const S* gp = g.data_ptr<S>();
  S* o = out.data_ptr<S>();
  for (int64_t i = 0; i < k; ++i) {
    o[i] = sp[i];
    o[k + i] = gp[i] / sp[k + i];
    o[2 * k + i] = sp[2 * k + i];
    o[3 * k + i] = gp[i] / sp[3 * k + i];
  }
  return out;
}

template <typename S>
Tensor3 kl_backward_impl(const OptTensor& grad_row, const OptTensor& grad_col, const Tensor& x_s, const Tensor& y_s,
                         const Tensor& x_t, const Tensor& y_t, const OptTensor& scale_s, double scale_s_value,
                         const OptTensor& scale_t, double scale_t_value, bool rows, bool cols, int64_t chunk_size,
                         const Tensor& row_stats, const Tensor& col_stats, bool need_x, bool need_y, bool need_scale) {
  const bool has_g = rows && grad_row.has_value() && grad_row->defined();
  const bool has_h = cols && grad_col.has_value() && grad_col->defined();
  if ((!has_g && !has_h) || !(need_x || need_y || need_scale))
    return {empty_like_x(x_s), empty_like_x(x_s), empty_like_x(x_s)};
  Side<S> st(x_s, y_s, scale_s, scale_s_value);
  Side<S> tt(x_t, y_t, scale_t, scale_t_value);
  const int64_t n = st.n, m = st.m;
  const auto opts = x_s.options().dtype(st.cdt);
  const Epilogues<S>& ep = epilogues<S>();
  Tensor rw = has_g ? kl_weights<S>(*grad_row, row_stats, n, opts) : Tensor();
  Tensor cw = has_h ? kl_weights<S>(*grad_col, col_stats, m, opts) : Tensor();
  const int64_t C = kl_chunk_rows(n, m, st.d + tt.d, sizeof(S), chunk_size);
  KlChunks<S> chunks(st, tt, C, opts);
  FeatureGrads<S> fg(st, C, need_x, need_y, need_scale, false);
  const S* r = has_g ? rw.data_ptr<S>() : nullptr;
  const S* cc = has_h ? cw.data_ptr<S>() : nullptr;
  for (int64_t i0 = 0; i0 < n; i0 += C) {
    const int64_t i1 = std::min(n, i0 + C), c = i1 - i0;
    chunks.compute(i0, i1);
    S* sp = chunks.s.template data_ptr<S>();
    const S* tp = chunks.t.template data_ptr<S>();
    for_each_row_block(c, m, [&](int64_t, int64_t r0, int64_t rr) {
      const int64_t i = i0 + r0;
      ep.kl_backward(sp + r0 * m, tp + r0 * m, m, rr, m, r ? r + i : nullptr, r ? r + n + i : nullptr,
                     r ? r + 2 * n + i : nullptr, r ? r + 3 * n + i : nullptr, cc, cc ? cc + m : nullptr,
                     cc ? cc + 2 * m : nullptr, cc ? cc + 3 * m : nullptr);
    });
    fg.add_chunk(i0, i1, chunks.s, chunks.a);
  }
  auto [dx, dy, dscale] = fg.finish();
  return {or_empty(dx, x_s), or_empty(dy, x_s), or_empty(dscale, x_s)};
}

template <typename F>
auto dispatch_float(at::ScalarType cdt, F&& f) {
  if (cdt == at::kDouble) return f(double(0));
  return f(float(0));
}

}  // namespace

// ----------------------------------------------------------------------------- entry points

Tensor5 similarity_lse(const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
                       const OptTensor& bias, double bias_value, Str exclude, int64_t offset,
                       const OptTensor& x_labels, const OptTensor& y_labels, bool rows, bool cols, Str backend,
                       int64_t chunk_size, bool deterministic, int64_t logit_budget) {
  (void)backend, (void)deterministic;
  check_features("x", x, "y", y);
  const int kind = mark_kind(exclude, "exclude");
  return dispatch_float(compute_dtype(x), [&](auto z) {
    using S = decltype(z);
    return lse_forward_impl<S>(x, y, scale, scale_value, bias, bias_value, kind, offset, x_labels, y_labels, rows,
                               cols, chunk_size, logit_budget);
  });
}

Tensor4 similarity_lse_backward(const OptTensor& grad_row_lse, const OptTensor& grad_col_lse, const Tensor& x,
                                const Tensor& y, const OptTensor& scale, double scale_value, const OptTensor& bias,
                                double bias_value, Str exclude, int64_t offset, const OptTensor& x_labels,
                                const OptTensor& y_labels, bool rows, bool cols, Str backend, int64_t chunk_size,
                                bool deterministic, int64_t logit_budget, const Tensor& row_stats,
                                const Tensor& col_stats, const Tensor& logits, bool need_x, bool need_y,
                                bool need_scale, bool need_bias) {
  (void)bias_value, (void)backend, (void)deterministic, (void)logit_budget;
  check_features("x", x, "y", y);
  const int kind = mark_kind(exclude, "exclude");
  return dispatch_float(compute_dtype(x), [&](auto z) {
    using S = decltype(z);
    return lse_backward_impl<S>(grad_row_lse, grad_col_lse, x, y, scale, scale_value, bias, kind, offset, x_labels,
                                y_labels, rows, cols, chunk_size, row_stats, col_stats, logits, need_x, need_y,
                                need_scale, need_bias);
  });
}

Tensor pairwise_sigmoid(const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
                        const OptTensor& bias, double bias_value, Str positives, int64_t offset,
                        const OptTensor& x_labels, const OptTensor& y_labels, Str backend, int64_t chunk_size,
                        bool deterministic) {
  (void)backend, (void)deterministic;
  check_features("x", x, "y", y);
  const int kind = mark_kind(positives, "positives");
  return dispatch_float(compute_dtype(x), [&](auto z) {
    using S = decltype(z);
    return std::get<4>(sigmoid_impl<S>(0, std::nullopt, x, y, scale, scale_value, bias, bias_value, kind, offset,
                                       x_labels, y_labels, chunk_size, false, false, false, false));
  });
}

Tensor4 pairwise_sigmoid_backward(const OptTensor& grad_rows, const Tensor& x, const Tensor& y,
                                  const OptTensor& scale, double scale_value, const OptTensor& bias,
                                  double bias_value, Str positives, int64_t offset, const OptTensor& x_labels,
                                  const OptTensor& y_labels, Str backend, int64_t chunk_size, bool deterministic,
                                  bool need_x, bool need_y, bool need_scale, bool need_bias) {
  (void)backend, (void)deterministic;
  check_features("x", x, "y", y);
  const int kind = mark_kind(positives, "positives");
  return dispatch_float(compute_dtype(x), [&](auto z) {
    using S = decltype(z);
    auto r = sigmoid_impl<S>(1, grad_rows, x, y, scale, scale_value, bias, bias_value, kind, offset, x_labels,
                             y_labels, chunk_size, need_x, need_y, need_scale, need_bias);
    return Tensor4{std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  });
}

Tensor5 pairwise_sigmoid_sum(const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
                             const OptTensor& bias, double bias_value, Str positives, int64_t offset,
                             const OptTensor& x_labels, const OptTensor& y_labels, Str backend, int64_t chunk_size,
                             bool deterministic, bool need_x, bool need_y, bool need_scale, bool need_bias) {
  (void)backend, (void)deterministic;
  check_features("x", x, "y", y);
  const int kind = mark_kind(positives, "positives");
  return dispatch_float(compute_dtype(x), [&](auto z) {
    using S = decltype(z);
    auto r = sigmoid_impl<S>(2, std::nullopt, x, y, scale, scale_value, bias, bias_value, kind, offset, x_labels,
                             y_labels, chunk_size, need_x, need_y, need_scale, need_bias);
    return Tensor5{std::get<4>(r), std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  });
}

Tensor4 similarity_kl(const Tensor& x_s, const Tensor& y_s, const Tensor& x_t, const Tensor& y_t,
                      const OptTensor& scale_s, double scale_s_value, const OptTensor& scale_t, double scale_t_value,
                      bool rows, bool cols, bool cross_entropy, Str backend, int64_t chunk_size, bool deterministic) {
  (void)backend, (void)deterministic;
  check_features("x_s", x_s, "y_s", y_s);
  check_features("x_t", x_t, "y_t", y_t);
  TORCH_CHECK_VALUE(x_t.size(0) == x_s.size(0) && y_t.size(0) == y_s.size(0),
                    "mmloss cpu: teacher and student must have the same rows, got x_s ", x_s.sizes(), ", y_s ",
                    y_s.sizes(), ", x_t ", x_t.sizes(), ", y_t ", y_t.sizes());
  TORCH_CHECK_TYPE(compute_dtype(x_s) == compute_dtype(x_t), "mmloss cpu: similarity_kl needs all four inputs fp64 "
                   "or none, got ", x_s.scalar_type(), " and ", x_t.scalar_type());
  return dispatch_float(compute_dtype(x_s), [&](auto z) {
    using S = decltype(z);
    return kl_forward_impl<S>(x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value, rows, cols,
                              cross_entropy, chunk_size);
  });
}

Tensor3 similarity_kl_backward(const OptTensor& grad_row, const OptTensor& grad_col, const Tensor& x_s,
                               const Tensor& y_s, const Tensor& x_t, const Tensor& y_t, const OptTensor& scale_s,
                               double scale_s_value, const OptTensor& scale_t, double scale_t_value, bool rows,
                               bool cols, bool cross_entropy, Str backend, int64_t chunk_size, bool deterministic,
                               const Tensor& row_stats, const Tensor& col_stats, bool need_x_s, bool need_y_s,
                               bool need_scale_s) {
  (void)cross_entropy, (void)backend, (void)deterministic;
  check_features("x_s", x_s, "y_s", y_s);
  check_features("x_t", x_t, "y_t", y_t);
  return dispatch_float(compute_dtype(x_s), [&](auto z) {
    using S = decltype(z);
    return kl_backward_impl<S>(grad_row, grad_col, x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t,
                               scale_t_value, rows, cols, chunk_size, row_stats, col_stats, need_x_s, need_y_s,
                               need_scale_s);
  });
}

std::pair<int64_t, int64_t> logit_blocks(int64_t n, int64_t m, int64_t d, int64_t elem, int64_t chunk_size) {
  TORCH_CHECK_VALUE(n >= 0 && m >= 0 && d >= 0 && elem > 0, "logit_blocks: sizes must be non-negative");
  const Tiling t = tiling(n, m, d, elem, chunk_size);
  return {t.br, t.bc};
}

const char* epilogue_isa() { return isa_name(epilogue_isa_in_use()); }

const char* epilogue_isas_built() {
#ifdef MMLOSS_HAVE_AVX2_EPILOGUES
  return "default,avx2,avx512";
#else
  return "default";
#endif
}

}  // namespace cpu
}  // namespace mmloss
