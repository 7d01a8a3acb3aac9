// Host side of the CUDA backend: the CUDA kernels of the mmloss_C ops (schemas:
// csrc/include/mmloss/schema.h; autograd, Meta kernels and the CPU kernels live in csrc/cpu).
//
// Algorithm (the torch backend's, mmloss/ops/torch_chunked.py and torch_kl.py, with fused
// epilogues): row chunks of the logit matrix, each computed by one tensor-core GEMM with fp32
// output (R = x_c·yᵀ: cuBLAS through ATen; fp16/bf16 operands through mm's out_dtype overload,
// fp32 operands through plain mm, which honours torch's TF32 setting), then one epilogue
// kernel (epilogues.cu) over the chunk and one small combine kernel:
//   forward   row statistics complete per chunk; column statistics merge into running records
//             in chunk order (deterministic: no atomics anywhere).
//   backward  the same chunks recomputed (same chunk plan, same GEMM, so every logit is
//             bit-identical), G (the logit gradient, without the scale) written in the operand
//             dtype, then A = G·y (fp32 out) → dx = s·A and dscale = ⟨x, A⟩ (row kernel), and
//             dy += Gᵀ·x_c (scalar scale: s applied once at the end) or Gᵀ·(s·x_c) (per-row
//             scale) accumulated in fp32.
// Cost per call: forward 1 GEMM-equivalent (similarity_kl: 2), backward 3 (similarity_kl: 4;
// similarity_lse with kept logits: 2). Memory: O((N+M)·D) plus a chunk workspace sized like
// the torch backend's (MMLOSS_CHUNK_BYTES; up to 512 MiB) and an (M, D) fp32 dy accumulator.
// Saved statistics have the torch backend's format ([shift, sum]; KL [max_s, sum_s, max_t,
// sum_t]) in this backend's units: S = s·(x·yᵀ) rounded once in fp32.
//
// This file includes no CUDA device code, so it is compiled once by the host compiler; the
// kernels (epilogues.cu) include no ATen header.
#include "ops_cuda.h"

#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "launch.h"

// mm(Tensor, Tensor, ScalarType out_dtype): fp16/bf16 operands with an fp32 result (torch 2.8+).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MMLOSS_HAVE_MM_OUT_DTYPE 1
#endif

namespace mmloss {
namespace cuda {
namespace {

// ------------------------------------------------------------------ small helpers

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mmloss cuda backend: launching ", what, " failed: ", cudaGetErrorString(err));
}

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, "the cuda backend takes float32, float16 and bfloat16 features, got ", t.scalar_type(),
                       " (use backend='torch' or 'reference' for float64, e.g. for gradcheck)");
  }
}

float* fptr(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<float>() : nullptr; }

const float* opt_fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

Tensor empty0(const Tensor& like) { return at::empty({0}, like.options()); }

int64_t round_up4(int64_t v) { return (v + 3) / 4 * 4; }

// out (a (rows, cols) fp32 view, any row stride) = a·b with fp32 accumulation and output.
void mm_f32(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
    return;
  }
#ifdef MMLOSS_HAVE_MM_OUT_DTYPE
  at::mm_out(out, a, b, at::kFloat);
#else
  at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
#endif
}

// A (rows, m) fp32 view of a chunk as the kernels read it.
Chunk make_chunk(const Tensor& s, int64_t row0, bool prescaled) {
  Chunk c;
  c.data = fptr(s);
  c.rows = s.size(0);
  c.m = s.size(1);
  c.ld = s.size(0) > 1 ? s.stride(0) : std::max<int64_t>(s.stride(0), c.m);
  c.row0 = row0;
  c.vec = c.ld % 4 == 0 && reinterpret_cast<uintptr_t>(c.data) % 16 == 0;
  c.prescaled = prescaled;
  return c;
}

// ------------------------------------------------------------------ chunk plan
// Mirrors mmloss/ops/torch_chunked.py (workspace_budget, chunk_rows) and torch_kl.py
// (kl_chunk_rows) with the accelerator cap, so MMLOSS_CHUNK_BYTES / chunk_size mean the same.

constexpr int64_t MiB = int64_t(1) << 20;
constexpr int64_t BUDGET_CAP = 512 * MiB;
constexpr int64_t BUDGET_FLOOR = 1 * MiB;
constexpr int64_t BLOCK_BYTES = 2 * MiB;
constexpr int64_t MIN_CHUNK_ROWS = 16;
constexpr int64_t MAX_CHUNK_ROWS = int64_t(65535) * TILE_ROWS;  // grid.y of the tile kernels

std::string trimmed_lower(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  std::string out = s.substr(b, e - b);
  for (char& ch : out) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return out;
}

int64_t parse_chunk_bytes(const char* env) {
  const std::string text = trimmed_lower(env);
  static const char* const suffixes[] = {"kib", "mib", "gib", "kb", "mb", "gb", "k", "m", "g"};
  double value = -1.0;
  bool ok = false;
  try {
    for (const char* suffix : suffixes) {
      const std::string s(suffix);
      if (text.size() > s.size() && text.compare(text.size() - s.size(), s.size(), s) == 0) {
        const std::string number = trimmed_lower(text.substr(0, text.size() - s.size()));
        size_t used = 0;
        const double v = std::stod(number, &used);
        const double unit = s[0] == 'k' ? 1024.0 : (s[0] == 'm' ? 1024.0 * 1024.0 : 1024.0 * 1024.0 * 1024.0);
        ok = used == number.size();
        value = v * unit;
        break;
      }
    }
    if (value < 0.0 && !ok) {
      size_t used = 0;
      const long long v = std::stoll(text, &used);
      ok = used == text.size();
      value = static_cast<double>(v);
    }
  } catch (const std::exception&) {
    ok = false;
  }
  TORCH_CHECK_VALUE(ok, "MMLOSS_CHUNK_BYTES must be a byte count such as 64MiB, got '", env, "'");
  TORCH_CHECK_VALUE(static_cast<int64_t>(value) > 0, "MMLOSS_CHUNK_BYTES must be positive, got '", env, "'");
  return static_cast<int64_t>(value);
}

int64_t workspace_budget(int64_t operand_bytes) {
  const char* env = std::getenv("MMLOSS_CHUNK_BYTES");
  if (env != nullptr && env[0] != '\0') return parse_chunk_bytes(env);
  return std::max(BUDGET_FLOOR, std::min(BUDGET_CAP, operand_bytes / 2));
}

int64_t clamp_rows(int64_t rows, int64_t n) {
  return std::max<int64_t>(1, std::min({rows, std::max<int64_t>(n, 1), MAX_CHUNK_ROWS}));
}

// similarity_lse / pairwise_sigmoid: torch_chunked.chunk_rows.
int64_t pair_chunk_rows(int64_t n, int64_t m, int64_t d, int64_t chunk_size) {
  if (chunk_size > 0) return clamp_rows(std::min(chunk_size, n), n);
  const int64_t budget = workspace_budget((n + m) * d * 4);
  const int64_t scratch = std::min(BLOCK_BYTES, budget / 8);
  const int64_t rows = (budget - scratch) / ((m + 2 * d) * 4);
  return clamp_rows(std::max(MIN_CHUNK_ROWS, rows), n);
}

// similarity_kl: torch_kl.kl_chunk_rows (four C×M buffers within half the budget).
int64_t kl_chunk_rows(int64_t n, int64_t m, int64_t dims, int64_t chunk_size) {
  if (chunk_size > 0) return clamp_rows(std::min(chunk_size, n), n);
  if (m <= 0) return clamp_rows(n, n);
  const int64_t budget = workspace_budget((n + m) * dims * 4);
  const int64_t rows = budget / (2 * 4 * m * 4);
  return clamp_rows(std::max(MIN_CHUNK_ROWS, rows), n);
}

// ------------------------------------------------------------------ one logit matrix

struct Pair {
  Tensor x, y;             // contiguous, operand dtype
  Tensor scale_t;          // fp32 copy of the scale tensor (undefined for a float scale)
  at::ScalarType scale_dtype = at::kFloat;
  std::vector<int64_t> scale_shape;
  Scale scale{};
  Tensor bias_t;
  at::ScalarType bias_dtype = at::kFloat;
  std::vector<int64_t> bias_shape;
  Scalar bias{};
  Tensor x_labels, y_labels;
  Marks marks{};
  int64_t n = 0, m = 0, d = 0;
  DType dtype = DType::F32;
};

int mark_kind(c10::string_view s, const char* what) {
  if (s == "none") return tile::MARK_NONE;
  if (s == "diagonal") return tile::MARK_DIAGONAL;
  if (s == "same_label") return tile::MARK_SAME_LABEL;
  TORCH_CHECK_VALUE(false, what, " must be 'none', 'diagonal' or 'same_label', got '", std::string(s), "'");
}

Pair make_pair(const char* x_name, const Tensor& x, const char* y_name, const Tensor& y, const OptTensor& scale,
               double scale_value, const OptTensor& bias, double bias_value, c10::string_view marks,
               const char* marks_name, int64_t offset, const OptTensor& x_labels, const OptTensor& y_labels) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda(), "the cuda backend runs on CUDA tensors, got ", x_name, " on ", x.device(),
              " and ", y_name, " on ", y.device());
  TORCH_CHECK(x.device() == y.device(), x_name, " and ", y_name, " must be on one device, got ", x.device(), " and ",
              y.device());
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), x_name, " and ", y_name,
              " must be (N, D) and (M, D), got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == y.scalar_type(), x_name, " and ", y_name, " must have one dtype, got ",
                   x.scalar_type(), " and ", y.scalar_type());
  Pair p;
  p.dtype = dtype_of(x);
  p.x = x.contiguous();
  p.y = y.contiguous();
  p.n = x.size(0);
  p.m = y.size(0);
  p.d = x.size(1);
  if (scale.has_value() && scale->defined()) {
    const Tensor& s = *scale;
    TORCH_CHECK(s.device() == x.device(), "scale must be on ", x.device(), ", got ", s.device());
    const bool per_row = s.dim() == 1;
    TORCH_CHECK(per_row ? s.numel() == p.n : s.numel() == 1, "scale must be a scalar or have one value per row of ",
                x_name, ", got shape ", s.sizes());
    p.scale_t = s.to(at::kFloat).contiguous();
    p.scale_dtype = s.scalar_type();
    p.scale_shape = s.sizes().vec();
    p.scale = Scale{p.scale_t.data_ptr<float>(), 0.0f, per_row};
  } else {
    p.scale = Scale{nullptr, static_cast<float>(scale_value), false};
  }
  if (bias.has_value() && bias->defined()) {
    const Tensor& b = *bias;
    TORCH_CHECK(b.device() == x.device() && b.numel() == 1, "bias must be a scalar on ", x.device(), ", got shape ",
                b.sizes(), " on ", b.device());
    p.bias_t = b.to(at::kFloat).contiguous();
    p.bias_dtype = b.scalar_type();
    p.bias_shape = b.sizes().vec();
    p.bias = Scalar{p.bias_t.data_ptr<float>(), 0.0f};
  } else {
    p.bias = Scalar{nullptr, static_cast<float>(bias_value)};
  }
  const int kind = mark_kind(marks, marks_name);
  p.marks = Marks{kind, offset, nullptr, nullptr};
  if (kind == tile::MARK_SAME_LABEL) {
    TORCH_CHECK(x_labels.has_value() && x_labels->defined() && y_labels.has_value() && y_labels->defined(),
                marks_name, "='same_label' needs x_labels and y_labels");
    TORCH_CHECK(x_labels->numel() == p.n && y_labels->numel() == p.m, "x_labels and y_labels must be (N,) and (M,)");
    p.x_labels = x_labels->to(x.device(), at::kLong).contiguous();
    p.y_labels = y_labels->to(x.device(), at::kLong).contiguous();
    p.marks.x_labels = p.x_labels.data_ptr<int64_t>();
    p.marks.y_labels = p.y_labels.data_ptr<int64_t>();
  }
  return p;
}

at::TensorOptions f32_options(const Pair& p) { return p.x.options().dtype(at::kFloat); }

// Σ of an fp32 vector in a fixed order, as a 0-d fp32 tensor.
Tensor ordered_sum_of(const Tensor& v, cudaStream_t stream) {
  Tensor out = at::empty({}, v.options().dtype(at::kFloat));
  check(ordered_sum(OrderedSum{fptr(v), nullptr, v.numel(), nullptr, nullptr, 0, out.data_ptr<float>()}, stream),
        "ordered_sum");
  return out;
}

// ------------------------------------------------------------------ feature gradients

// dx, dy, dscale from the logit-gradient chunks G (w.r.t. L = s·⟨x, y⟩ + b, without s).
class FeatureGrads {
 public:
  FeatureGrads(const Pair& p, int64_t chunk, bool need_x, bool need_y, bool need_scale, bool f32_out)
      : p_(p), nx_(need_x), ny_(need_y), ns_(need_scale && p.scale.ptr != nullptr), f32_out_(f32_out) {
    const auto f32 = f32_options(p);
    if (nx_) dx_ = at::empty({p.n, p.d}, f32_out ? f32 : p.x.options());
    if (ns_) dscale_rows_ = at::empty({p.n}, f32);
    if (nx_ || ns_) a_ = at::empty({chunk, p.d}, f32);
    if (ny_) {
      dy_ = at::empty({p.m, p.d}, f32);
      if (p.dtype != DType::F32) dy_tmp_ = at::empty({p.m, p.d}, f32);
      if (p.scale.per_row) xs_ = at::empty({chunk, p.d}, p.x.options());
    }
  }

  bool any() const { return nx_ || ny_ || ns_; }

  // G: the (c, m) logit gradient of rows [i0, i0 + c) in the operand dtype.
  void add_chunk(int64_t i0, int64_t c, const Tensor& g, cudaStream_t stream) {
    const bool need_a = nx_ || ns_;
    const bool need_xs = ny_ && p_.scale.per_row;
    Tensor a;
    if (need_a) {
      a = a_.narrow(0, 0, c);
      mm_f32(a, g, p_.y);
    }
    if (need_a || need_xs) {
      RowGrads args{need_a ? a.data_ptr<float>() : nullptr,
                    p_.x.narrow(0, i0, c).data_ptr(),
                    c,
                    p_.d,
                    i0,
                    p_.scale,
                    nx_ ? dx_.narrow(0, i0, c).data_ptr() : nullptr,
                    f32_out_ ? DType::F32 : p_.dtype,
                    ns_ ? dscale_rows_.data_ptr<float>() : nullptr,
                    need_xs ? xs_.data_ptr() : nullptr};
      check(row_grads(args, p_.dtype, stream), "row_grads");
    }
    if (ny_) {
      const Tensor operand = need_xs ? xs_.narrow(0, 0, c) : p_.x.narrow(0, i0, c);
      const Tensor gt = g.t();
      if (first_) {
        mm_f32(dy_, gt, operand);
      } else if (p_.dtype == DType::F32) {
        at::addmm_out(dy_, dy_, gt, operand);
      } else {
        mm_f32(dy_tmp_, gt, operand);
        dy_.add_(dy_tmp_);
      }
    }
    first_ = false;
  }

  // (dx, dy, dscale); undefined where not needed. Casts to the inputs' dtypes unless f32_out.
  std::tuple<Tensor, Tensor, Tensor> finish(cudaStream_t stream) {
    Tensor dy, dscale;
    if (ny_) {
      if (first_) dy_.zero_();
      if (!p_.scale.per_row) {
        if (p_.scale.ptr != nullptr) dy_.mul_(p_.scale_t.reshape({}));
        else if (p_.scale.value != 1.0f) dy_.mul_(static_cast<double>(p_.scale.value));
      }
      dy = f32_out_ ? dy_ : dy_.to(p_.y.scalar_type());
    }
    if (ns_) {
      dscale = p_.scale.per_row ? dscale_rows_ : ordered_sum_of(dscale_rows_, stream).reshape(p_.scale_shape);
      if (!f32_out_) dscale = dscale.to(p_.scale_dtype);
    }
    return {dx_, dy, dscale};
  }

 private:
  const Pair& p_;
  bool nx_, ny_, ns_, f32_out_;
  bool first_ = true;
  Tensor dx_, dy_, dy_tmp_, dscale_rows_, a_, xs_;
};

Tensor or_empty(const Tensor& t, const Tensor& like) { return t.defined() ? t : empty0(like); }

Tensor cast_bias(const Tensor& dbias, const Pair& p) {
  if (!p.bias_t.defined()) return dbias;
  return dbias.reshape(p.bias_shape).to(p.bias_dtype);
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

Tensor defined_f32(const OptTensor& t, bool use) {
  if (!use || !t.has_value() || !t->defined()) return Tensor();
  return t->to(at::kFloat).contiguous();
}

}  // namespace

// ==================================================================== similarity_lse

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> similarity_lse(
    const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value, const OptTensor& bias,
    double bias_value, c10::string_view exclude, int64_t offset, const OptTensor& x_labels,
    const OptTensor& y_labels, bool rows, bool cols, c10::string_view /*backend*/, int64_t chunk_size,
    bool /*deterministic: always*/, int64_t logit_budget) {
  c10::cuda::CUDAGuard guard(x.device());
  const Pair p = make_pair("x", x, "y", y, scale, scale_value, bias, bias_value, exclude, "exclude", offset, x_labels,
                           y_labels);
  const cudaStream_t stream = current_stream();
  const auto f32 = f32_options(p);
  const int64_t n = p.n, m = p.m;
  // mmloss/ops/_spec.keeps_logits: 0 < N·M·4 ≤ budget.
  const bool keep = logit_budget > 0 && n * m > 0 && n * m * 4 <= logit_budget;
  Tensor kept = keep ? at::empty({n, m}, f32) : at::empty({0}, f32);
  Tensor row_lse = at::empty({rows ? n : 0}, f32), row_stats = at::empty({2, rows ? n : 0}, f32);
  Tensor col_lse = at::full({cols ? m : 0}, -std::numeric_limits<double>::infinity(), f32);
  Tensor col_stats = at::zeros({2, cols ? m : 0}, f32);
  if (n == 0) return {row_lse, col_lse, row_stats, col_stats, kept};
  const int64_t chunk = pair_chunk_rows(n, m, p.d, chunk_size), ld = round_up4(m);
  const Tensor work = keep ? Tensor() : at::empty({chunk, ld}, f32);
  const int64_t ntc = tiles(m, TILE_COLS);
  const Tensor row_part = rows ? at::empty({2 * ntc * chunk}, f32) : Tensor();
  const Tensor col_part = cols ? at::empty({2 * tiles(chunk, TILE_ROWS) * m}, f32) : Tensor();
  const Tensor yt = p.y.t();
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t c = std::min(chunk, n - i0);
    Tensor s = keep ? kept.narrow(0, i0, c) : work.narrow(0, 0, c).narrow(1, 0, m);
    mm_f32(s, p.x.narrow(0, i0, c), yt);
    const LseForward fw{make_chunk(s, i0, false), p.scale, p.marks, keep, fptr(row_part), fptr(col_part)};
    check(lse_forward(fw, stream), "similarity_lse forward epilogue");
    const LseCombine cb{fptr(row_part), fptr(col_part), c,           m,         i0,          n,
                        p.bias,         fptr(row_stats), fptr(row_lse), fptr(col_stats), fptr(col_lse),
                        i0 == 0,        i0 + c >= n};
    check(lse_combine(cb, stream), "similarity_lse combine");
  }
  return {row_lse, col_lse, row_stats, col_stats, kept};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> similarity_lse_backward(
    const OptTensor& grad_row_lse, const OptTensor& grad_col_lse, const Tensor& x, const Tensor& y,
    const OptTensor& scale, double scale_value, const OptTensor& bias, double bias_value, c10::string_view exclude,
    int64_t offset, const OptTensor& x_labels, const OptTensor& y_labels, bool rows, bool cols,
    c10::string_view /*backend*/, int64_t chunk_size, bool /*deterministic*/, int64_t /*logit_budget*/,
    const Tensor& row_stats_in, const Tensor& col_stats_in, const Tensor& logits, bool need_x, bool need_y,
    bool need_scale, bool need_bias) {
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor g = defined_f32(grad_row_lse, rows), h = defined_f32(grad_col_lse, cols);
  if (!g.defined() && !h.defined()) return {empty0(x), empty0(x), empty0(x), empty0(x)};
  const Pair p = make_pair("x", x, "y", y, scale, scale_value, bias, bias_value, exclude, "exclude", offset, x_labels,
                           y_labels);
  const cudaStream_t stream = current_stream();
  const auto f32 = f32_options(p);
  const int64_t n = p.n, m = p.m;
  const Tensor row_stats = row_stats_in.to(at::kFloat).contiguous();
  const Tensor col_stats = col_stats_in.to(at::kFloat).contiguous();
  TORCH_CHECK(!g.defined() || (row_stats.dim() == 2 && row_stats.size(0) == 2 && row_stats.size(1) == n),
              "similarity_lse backward: row_stats must be (2, ", n, "), got ", row_stats.sizes());
  TORCH_CHECK(!h.defined() || (col_stats.dim() == 2 && col_stats.size(0) == 2 && col_stats.size(1) == m),
              "similarity_lse backward: col_stats must be (2, ", m, "), got ", col_stats.sizes());
  const bool have_kept = logits.numel() > 0;
  Tensor kept;
  if (have_kept) {
    TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(0) == n && logits.size(1) == m &&
                          logits.scalar_type() == at::kFloat,
                      "similarity_lse backward: kept logits must be (", n, ", ", m, ") float32, got ", logits.sizes(),
                      " ", logits.scalar_type());
    kept = logits.contiguous();
  }
  const int64_t chunk = pair_chunk_rows(n, m, p.d, chunk_size), ld = round_up4(m);
  FeatureGrads grads(p, chunk, need_x, need_y, need_scale, false);
  if (grads.any() && n > 0) {
    const Tensor work = have_kept ? Tensor() : at::empty({chunk, ld}, f32);
    // fp32 operands: G overwrites the recomputed chunk in place (each element by its own thread).
    const Tensor gbuf = (!have_kept && p.dtype == DType::F32) ? work : at::empty({chunk, ld}, p.x.options());
    const Tensor yt = p.y.t();
    for (int64_t i0 = 0; i0 < n; i0 += chunk) {
      const int64_t c = std::min(chunk, n - i0);
      Tensor s = have_kept ? kept.narrow(0, i0, c) : work.narrow(0, 0, c).narrow(1, 0, m);
      if (!have_kept) mm_f32(s, p.x.narrow(0, i0, c), yt);
      const LseBackward bw{make_chunk(s, i0, have_kept), p.scale, p.marks, opt_fptr(row_stats), opt_fptr(g), n,
                           opt_fptr(col_stats),          opt_fptr(h), gbuf.data_ptr(), ld};
      check(lse_backward(bw, p.dtype, stream), "similarity_lse backward epilogue");
      grads.add_chunk(i0, c, gbuf.narrow(0, 0, c).narrow(1, 0, m), stream);
    }
  }
  auto [dx, dy, dscale] = grads.finish(stream);
  Tensor dbias;
  if (need_bias) {
    // Σ_ij G_ij = Σ_i g_i + Σ_j h_j over rows / columns with an allowed pair.
    dbias = at::empty({}, f32);
    const OrderedSum sum{opt_fptr(g), g.defined() ? row_stats.data_ptr<float>() + n : nullptr, g.defined() ? n : 0,
                         opt_fptr(h), h.defined() ? col_stats.data_ptr<float>() + m : nullptr, h.defined() ? m : 0,
                         dbias.data_ptr<float>()};
    check(ordered_sum(sum, stream), "similarity_lse bias gradient");
    dbias = cast_bias(dbias, p);
  }
  return {or_empty(dx, x), or_empty(dy, x), or_empty(dscale, x), or_empty(dbias, x)};
}

// ==================================================================== pairwise_sigmoid

Tensor pairwise_sigmoid(const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
                        const OptTensor& bias, double bias_value, c10::string_view positives, int64_t offset,
                        const OptTensor& x_labels, const OptTensor& y_labels, c10::string_view /*backend*/,
                        int64_t chunk_size, bool /*deterministic*/) {
  c10::cuda::CUDAGuard guard(x.device());
  const Pair p = make_pair("x", x, "y", y, scale, scale_value, bias, bias_value, positives, "positives", offset,
                           x_labels, y_labels);
  const cudaStream_t stream = current_stream();
  const auto f32 = f32_options(p);
  const int64_t n = p.n, m = p.m;
  Tensor out = at::empty({n}, f32);
  if (n == 0) return out;
  const int64_t chunk = pair_chunk_rows(n, m, p.d, chunk_size), ld = round_up4(m);
  const Tensor work = at::empty({chunk, ld}, f32);
  const Tensor row_part = at::empty({tiles(m, TILE_COLS) * chunk}, f32);
  const Tensor yt = p.y.t();
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t c = std::min(chunk, n - i0);
    Tensor s = work.narrow(0, 0, c).narrow(1, 0, m);
    mm_f32(s, p.x.narrow(0, i0, c), yt);
    check(sigmoid_forward(SigmoidForward{make_chunk(s, i0, false), p.scale, p.marks, p.bias, fptr(row_part)}, stream),
          "pairwise_sigmoid forward epilogue");
    check(row_sums(RowSums{fptr(row_part), c, m, i0, n, 1, fptr(out)}, stream), "pairwise_sigmoid row sums");
  }
  return out;
}

namespace {

// The sigmoid backward pass shared by pairwise_sigmoid_backward (upstream row gradients) and
// pairwise_sigmoid_sum (upstream 1, with the loss): fills `grads`; `row_out` (fields, n) gets
// Σ_j G per row (field 0) and, with_loss, Σ_j softplus (field 1).
void sigmoid_pass(const Pair& p, int64_t chunk_size, const Tensor& row_grad, bool with_loss, const Tensor& row_out,
                  FeatureGrads& grads, cudaStream_t stream) {
  const auto f32 = f32_options(p);
  const int64_t n = p.n, m = p.m;
  if (n == 0) return;
  const int64_t chunk = pair_chunk_rows(n, m, p.d, chunk_size), ld = round_up4(m);
  const int fields = with_loss ? 2 : 1;
  const Tensor work = at::empty({chunk, ld}, f32);
  const Tensor gbuf = p.dtype == DType::F32 ? work : at::empty({chunk, ld}, p.x.options());
  const Tensor row_part = at::empty({fields * tiles(m, TILE_COLS) * chunk}, f32);
  const Tensor yt = p.y.t();
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t c = std::min(chunk, n - i0);
    Tensor s = work.narrow(0, 0, c).narrow(1, 0, m);
    mm_f32(s, p.x.narrow(0, i0, c), yt);
    const SigmoidBackward bw{make_chunk(s, i0, false), p.scale, p.marks, p.bias, opt_fptr(row_grad),
                             with_loss,                fptr(row_part), gbuf.data_ptr(), ld};
    check(sigmoid_backward(bw, p.dtype, stream), "pairwise_sigmoid backward epilogue");
    check(row_sums(RowSums{fptr(row_part), c, m, i0, n, fields, fptr(row_out)}, stream), "pairwise_sigmoid row sums");
    grads.add_chunk(i0, c, gbuf.narrow(0, 0, c).narrow(1, 0, m), stream);
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> pairwise_sigmoid_backward(
    const OptTensor& grad_rows, const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
    const OptTensor& bias, double bias_value, c10::string_view positives, int64_t offset, const OptTensor& x_labels,
    const OptTensor& y_labels, c10::string_view /*backend*/, int64_t chunk_size, bool /*deterministic*/, bool need_x,
    bool need_y, bool need_scale, bool need_bias) {
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor g = defined_f32(grad_rows, true);
  if (!g.defined()) return {empty0(x), empty0(x), empty0(x), empty0(x)};
  const Pair p = make_pair("x", x, "y", y, scale, scale_value, bias, bias_value, positives, "positives", offset,
                           x_labels, y_labels);
  const cudaStream_t stream = current_stream();
  const int64_t chunk = pair_chunk_rows(p.n, p.m, p.d, chunk_size);
  FeatureGrads grads(p, chunk, need_x, need_y, need_scale, false);
  const Tensor gsum_rows = at::zeros({1, p.n}, f32_options(p));
  if (grads.any() || need_bias) sigmoid_pass(p, chunk_size, g, false, gsum_rows, grads, stream);
  auto [dx, dy, dscale] = grads.finish(stream);
  Tensor dbias;
  if (need_bias) dbias = cast_bias(ordered_sum_of(gsum_rows, stream), p);
  return {or_empty(dx, x), or_empty(dy, x), or_empty(dscale, x), or_empty(dbias, x)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pairwise_sigmoid_sum(
    const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value, const OptTensor& bias,
    double bias_value, c10::string_view positives, int64_t offset, const OptTensor& x_labels,
    const OptTensor& y_labels, c10::string_view backend, int64_t chunk_size, bool deterministic, bool need_x,
    bool need_y, bool need_scale, bool need_bias) {
  const bool want_grads = need_x || need_y || need_scale || need_bias;
  if (!want_grads) {
    const Tensor rows = pairwise_sigmoid(x, y, scale, scale_value, bias, bias_value, positives, offset, x_labels,
                                         y_labels, backend, chunk_size, deterministic);
    c10::cuda::CUDAGuard guard(x.device());
    return {ordered_sum_of(rows, current_stream()), empty0(x), empty0(x), empty0(x), empty0(x)};
  }
  c10::cuda::CUDAGuard guard(x.device());
  const Pair p = make_pair("x", x, "y", y, scale, scale_value, bias, bias_value, positives, "positives", offset,
                           x_labels, y_labels);
  const cudaStream_t stream = current_stream();
  const int64_t chunk = pair_chunk_rows(p.n, p.m, p.d, chunk_size);
  // The gradients of a sum over N·M pairs stay fp32 (they can exceed fp16's range before the
  // upstream gradient scales them; mmloss/ops/torch_chunked.pairwise_sigmoid_sum).
  FeatureGrads grads(p, chunk, need_x, need_y, need_scale, true);
  const Tensor row_out = at::zeros({2, p.n}, f32_options(p));
  sigmoid_pass(p, chunk_size, Tensor(), true, row_out, grads, stream);
  auto [dx, dy, dscale] = grads.finish(stream);
  const Tensor total = ordered_sum_of(row_out.select(0, 1), stream);
  Tensor dbias;
  if (need_bias) {
    dbias = ordered_sum_of(row_out.select(0, 0), stream);
    if (p.bias_t.defined()) dbias = dbias.reshape(p.bias_shape);
  }
  return {total, or_empty(dx, x), or_empty(dy, x), or_empty(dscale, x), or_empty(dbias, x)};
}

// ==================================================================== similarity_kl

namespace {

struct KlPairs {
  Pair s, t;
};

KlPairs make_kl(const Tensor& x_s, const Tensor& y_s, const Tensor& x_t, const Tensor& y_t, const OptTensor& scale_s,
                double scale_s_value, const OptTensor& scale_t, double scale_t_value) {
  const OptTensor none;
  KlPairs k{make_pair("x_s", x_s, "y_s", y_s, scale_s, scale_s_value, none, 0.0, "none", "marks", 0, none, none),
            make_pair("x_t", x_t, "y_t", y_t, scale_t, scale_t_value, none, 0.0, "none", "marks", 0, none, none)};
  TORCH_CHECK(k.s.n == k.t.n && k.s.m == k.t.m, "teacher and student must have the same rows: x_s ", x_s.sizes(),
              ", x_t ", x_t.sizes(), ", y_s ", y_s.sizes(), ", y_t ", y_t.sizes());
  TORCH_CHECK(!k.s.scale.per_row && !k.t.scale.per_row, "similarity_kl takes scalar scales");
  TORCH_CHECK(x_s.device() == x_t.device(), "student and teacher must be on one device");
  return k;
}

// Both chunks of rows [i0, i0 + c): the student's into ws, the teacher's into wt (same ld).
void kl_chunks(const KlPairs& k, const Tensor& ws, const Tensor& wt, int64_t i0, int64_t c, Tensor& s, Tensor& t) {
  s = ws.narrow(0, 0, c).narrow(1, 0, k.s.m);
  t = wt.narrow(0, 0, c).narrow(1, 0, k.s.m);
  mm_f32(s, k.s.x.narrow(0, i0, c), k.s.y.t());
  mm_f32(t, k.t.x.narrow(0, i0, c), k.t.y.t());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> similarity_kl(
    const Tensor& x_s, const Tensor& y_s, const Tensor& x_t, const Tensor& y_t, const OptTensor& scale_s,
    double scale_s_value, const OptTensor& scale_t, double scale_t_value, bool rows, bool cols, bool cross_entropy,
    c10::string_view /*backend*/, int64_t chunk_size, bool /*deterministic*/) {
  c10::cuda::CUDAGuard guard(x_s.device());
  const KlPairs k = make_kl(x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value);
  const cudaStream_t stream = current_stream();
  const auto f32 = f32_options(k.s);
  const int64_t n = k.s.n, m = k.s.m;
  Tensor row = at::empty({rows ? n : 0}, f32), row_stats = at::empty({4, rows ? n : 0}, f32);
  Tensor col = at::empty({cols ? m : 0}, f32), col_stats = at::empty({4, cols ? m : 0}, f32);
  if (n == 0 || m == 0) {
    // Nothing to average over: the torch backend's empty-record values (NaN KL, zero statistics).
    return {at::full({rows ? n : 0}, std::numeric_limits<double>::quiet_NaN(), f32),
            at::full({cols ? m : 0}, std::numeric_limits<double>::quiet_NaN(), f32), at::zeros({4, rows ? n : 0}, f32),
            at::zeros({4, cols ? m : 0}, f32)};
  }
  const int64_t chunk = kl_chunk_rows(n, m, k.s.d + k.t.d, chunk_size), ld = round_up4(m);
  const Tensor ws = at::empty({chunk, ld}, f32), wt = at::empty({chunk, ld}, f32);
  constexpr int fields = 6;
  const Tensor row_part = rows ? at::empty({fields * tiles(m, TILE_COLS) * chunk}, f32) : Tensor();
  const Tensor col_part = cols ? at::empty({fields * tiles(chunk, TILE_ROWS) * m}, f32) : Tensor();
  const Tensor col_run = cols ? at::empty({fields, m}, f32) : Tensor();
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t c = std::min(chunk, n - i0);
    Tensor s, t;
    kl_chunks(k, ws, wt, i0, c, s, t);
    const KlForward fw{make_chunk(s, i0, false), fptr(t), k.s.scale, k.t.scale, cross_entropy, fptr(row_part),
                       fptr(col_part)};
    check(kl_forward(fw, stream), "similarity_kl forward epilogue");
    const KlCombine cb{fptr(row_part), fptr(col_part), c,       m,          i0,      n,           cross_entropy,
                       fptr(row),      fptr(row_stats), fptr(col_run), fptr(col), fptr(col_stats), i0 == 0, i0 + c >= n};
    check(kl_combine(cb, stream), "similarity_kl combine");
  }
  return {row, col, row_stats, col_stats};
}

std::tuple<Tensor, Tensor, Tensor> similarity_kl_backward(
    const OptTensor& grad_row, const OptTensor& grad_col, const Tensor& x_s, const Tensor& y_s, const Tensor& x_t,
    const Tensor& y_t, const OptTensor& scale_s, double scale_s_value, const OptTensor& scale_t,
    double scale_t_value, bool rows, bool cols, bool /*cross_entropy: same gradient*/, c10::string_view /*backend*/,
    int64_t chunk_size, bool /*deterministic*/, const Tensor& row_stats_in, const Tensor& col_stats_in,
    bool need_x_s, bool need_y_s, bool need_scale_s) {
  c10::cuda::CUDAGuard guard(x_s.device());
  const Tensor g = defined_f32(grad_row, rows), h = defined_f32(grad_col, cols);
  if (!g.defined() && !h.defined()) return {empty0(x_s), empty0(x_s), empty0(x_s)};
  const KlPairs k = make_kl(x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value);
  const cudaStream_t stream = current_stream();
  const auto f32 = f32_options(k.s);
  const int64_t n = k.s.n, m = k.s.m;
  const Tensor row_stats = row_stats_in.to(at::kFloat).contiguous();
  const Tensor col_stats = col_stats_in.to(at::kFloat).contiguous();
  TORCH_CHECK(!g.defined() || (row_stats.dim() == 2 && row_stats.size(0) == 4 && row_stats.size(1) == n),
              "similarity_kl backward: row_stats must be (4, ", n, "), got ", row_stats.sizes());
  TORCH_CHECK(!h.defined() || (col_stats.dim() == 2 && col_stats.size(0) == 4 && col_stats.size(1) == m),
              "similarity_kl backward: col_stats must be (4, ", m, "), got ", col_stats.sizes());
  const int64_t chunk = kl_chunk_rows(n, m, k.s.d + k.t.d, chunk_size), ld = round_up4(m);
  FeatureGrads grads(k.s, chunk, need_x_s, need_y_s, need_scale_s, false);
  if (grads.any() && n > 0 && m > 0) {
    const Tensor ws = at::empty({chunk, ld}, f32), wt = at::empty({chunk, ld}, f32);
    // fp32 student operands: G overwrites the student chunk in place.
    const Tensor gbuf = k.s.dtype == DType::F32 ? ws : at::empty({chunk, ld}, k.s.x.options());
    for (int64_t i0 = 0; i0 < n; i0 += chunk) {
      const int64_t c = std::min(chunk, n - i0);
      Tensor s, t;
      kl_chunks(k, ws, wt, i0, c, s, t);
      const KlBackward bw{make_chunk(s, i0, false), fptr(t),     k.s.scale,         k.t.scale, opt_fptr(row_stats),
                          opt_fptr(g),              n,           opt_fptr(col_stats), opt_fptr(h), gbuf.data_ptr(),
                          ld};
      check(kl_backward(bw, k.s.dtype, stream), "similarity_kl backward epilogue");
      grads.add_chunk(i0, c, gbuf.narrow(0, 0, c).narrow(1, 0, m), stream);
    }
  }
  auto [dx, dy, dscale] = grads.finish(stream);
  return {or_empty(dx, x_s), or_empty(dy, x_s), or_empty(dscale, x_s)};
}

}  // namespace cuda
}  // namespace mmloss

TORCH_LIBRARY_IMPL(mmloss_C, CUDA, m) {
  m.impl("similarity_lse", &mmloss::cuda::similarity_lse);
  m.impl("similarity_lse_backward", &mmloss::cuda::similarity_lse_backward);
  m.impl("pairwise_sigmoid", &mmloss::cuda::pairwise_sigmoid);
  m.impl("pairwise_sigmoid_backward", &mmloss::cuda::pairwise_sigmoid_backward);
  m.impl("pairwise_sigmoid_sum", &mmloss::cuda::pairwise_sigmoid_sum);
  m.impl("similarity_kl", &mmloss::cuda::similarity_kl);
  m.impl("similarity_kl_backward", &mmloss::cuda::similarity_kl_backward);
}
