// The mmloss_C op library: schemas (csrc/include/mmloss/schema.h, generated from the Python
// declarations), the CPU kernels (csrc/cpu/ops.cpp), Meta kernels (shapes and dtypes as the
// Python fakes in mmloss/ops/_schema.py and _primitives.py, symbolic sizes for torch.compile)
// and autograd at the Autograd key, so a call from Python goes straight into C++.
//
// Autograd mirrors mmloss/ops/_schema.py: the forward saves the tensor arguments and the saved
// (statistics) outputs and calls `<op>_backward` through the dispatcher with need_* flags from
// requires_grad; backward ops raise on double backward; pairwise_sigmoid_sum's backward rescales
// the gradients it formed in the forward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <c10/core/SymInt.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cpu/ops.h"
#include "mmloss/schema.h"

namespace mmloss {
namespace {

using at::Tensor;
using cpu::OptTensor;
using cpu::Str;
using cpu::Tensor3;
using cpu::Tensor4;
using cpu::Tensor5;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Same message as mmloss.ops._schema.double_backward_error.
[[noreturn]] void double_backward_error() {
  TORCH_CHECK(false,
              "mmloss primitives do not support double backward (create_graph=True through "
              "similarity_lse / pairwise_sigmoid / similarity_kl); compute higher-order terms with the "
              "reference backend");
}

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

Tensor opt_or_undef(const OptTensor& t) { return defined(t) ? *t : Tensor(); }

OptTensor undef_to_opt(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// ----------------------------------------------------------------------------- Meta kernels

at::ScalarType compute_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// _schema.row_col_fake
Tensor4 row_col_meta(const Tensor& x, const Tensor& y, bool rows, bool cols, int64_t fields) {
  const auto opts = x.options().dtype(compute_dtype(x));
  const c10::SymInt n = rows ? x.sym_size(0) : c10::SymInt(0);
  const c10::SymInt m = cols ? y.sym_size(0) : c10::SymInt(0);
  return {at::empty_symint({n}, opts), at::empty_symint({m}, opts), at::empty_symint({c10::SymInt(fields), n}, opts),
          at::empty_symint({c10::SymInt(fields), m}, opts)};
}

Tensor grad_like(const Tensor& t, bool need, const Tensor& x) {
  return need ? at::empty_symint(t.sym_sizes(), t.options()) : at::empty({0}, x.options());
}

Tensor grad_like_opt(const OptTensor& t, bool need, const Tensor& x) {
  return (need && defined(t)) ? at::empty_symint(t->sym_sizes(), t->options()) : at::empty({0}, x.options());
}

Tensor5 similarity_lse_meta(const Tensor& x, const Tensor& y, const OptTensor&, double, const OptTensor&, double, Str,
                            int64_t, const OptTensor&, const OptTensor&, bool rows, bool cols, Str, int64_t, bool,
                            int64_t logit_budget) {
  auto [row, col, rs, cs] = row_col_meta(x, y, rows, cols, 2);
  const auto cdt = compute_dtype(x);
  const auto opts = x.options().dtype(cdt);
  Tensor logits = at::empty({0}, opts);
  if (logit_budget > 0) {
    // _spec.keeps_logits: 0 < N·M·elem ≤ budget (a guard when N, M are symbolic).
    const c10::SymInt size = x.sym_size(0) * y.sym_size(0) * (cdt == at::kDouble ? 8 : 4);
    if (size.sym_gt(0).guard_bool(__FILE__, __LINE__) && size.sym_le(logit_budget).guard_bool(__FILE__, __LINE__))
      logits = at::empty_symint({x.sym_size(0), y.sym_size(0)}, opts);
  }
  return {row, col, rs, cs, logits};
}

Tensor4 similarity_lse_backward_meta(const OptTensor&, const OptTensor&, const Tensor& x, const Tensor& y,
                                     const OptTensor& scale, double, const OptTensor& bias, double, Str, int64_t,
                                     const OptTensor&, const OptTensor&, bool, bool, Str, int64_t, bool, int64_t,
                                     const Tensor&, const Tensor&, const Tensor&, bool need_x, bool need_y,
                                     bool need_scale, bool need_bias) {
  return {grad_like(x, need_x, x), grad_like(y, need_y, x), grad_like_opt(scale, need_scale, x),
          grad_like_opt(bias, need_bias, x)};
}

Tensor pairwise_sigmoid_meta(const Tensor& x, const Tensor&, const OptTensor&, double, const OptTensor&, double, Str,
                             int64_t, const OptTensor&, const OptTensor&, Str, int64_t, bool) {
  return at::empty_symint({x.sym_size(0)}, x.options().dtype(compute_dtype(x)));
}

Tensor4 pairwise_sigmoid_backward_meta(const OptTensor&, const Tensor& x, const Tensor& y, const OptTensor& scale,
                                       double, const OptTensor& bias, double, Str, int64_t, const OptTensor&,
                                       const OptTensor&, Str, int64_t, bool, bool need_x, bool need_y,
                                       bool need_scale, bool need_bias) {
  return {grad_like(x, need_x, x), grad_like(y, need_y, x), grad_like_opt(scale, need_scale, x),
          grad_like_opt(bias, need_bias, x)};
}

// _primitives._sigmoid_sum_fake: gradients in the compute dtype.
Tensor5 pairwise_sigmoid_sum_meta(const Tensor& x, const Tensor& y, const OptTensor& scale, double,
                                  const OptTensor& bias, double, Str, int64_t, const OptTensor&, const OptTensor&, Str,
                                  int64_t, bool, bool need_x, bool need_y, bool need_scale, bool need_bias) {
  const auto opts = x.options().dtype(compute_dtype(x));
  auto grad = [&](const Tensor& t, bool need) {
    return (need && t.defined()) ? at::empty_symint(t.sym_sizes(), opts) : at::empty({0}, x.options());
  };
  return {at::empty({}, opts), grad(x, need_x), grad(y, need_y), grad(opt_or_undef(scale), need_scale),
          grad(opt_or_undef(bias), need_bias)};
}

Tensor4 similarity_kl_meta(const Tensor& x_s, const Tensor& y_s, const Tensor&, const Tensor&, const OptTensor&,
                           double, const OptTensor&, double, bool rows, bool cols, bool, Str, int64_t, bool) {
  return row_col_meta(x_s, y_s, rows, cols, 4);
}

Tensor3 similarity_kl_backward_meta(const OptTensor&, const OptTensor&, const Tensor& x_s, const Tensor& y_s,
                                    const Tensor&, const Tensor&, const OptTensor& scale_s, double, const OptTensor&,
                                    double, bool, bool, bool, Str, int64_t, bool, const Tensor&, const Tensor&,
                                    bool need_x, bool need_y, bool need_scale) {
  return {grad_like(x_s, need_x, x_s), grad_like(y_s, need_y, x_s), grad_like_opt(scale_s, need_scale, x_s)};
}

// ----------------------------------------------------------------------------- autograd helpers

// Edge index of each tensor argument (custom Function edges count only defined tensors), in
// argument order; -1 for an absent optional tensor.
struct Edges {
  int next = 0;
  int add(bool present) { return present ? next++ : -1; }
};

bool needs(AutogradContext* ctx, int64_t edge) { return edge >= 0 && ctx->needs_input_grad(edge); }

int64_t get_int(AutogradContext* ctx, const char* k) { return ctx->saved_data[k].toInt(); }
double get_double(AutogradContext* ctx, const char* k) { return ctx->saved_data[k].toDouble(); }
bool get_bool(AutogradContext* ctx, const char* k) { return ctx->saved_data[k].toBool(); }
std::string get_str(AutogradContext* ctx, const char* k) { return ctx->saved_data[k].toStringRef(); }

// ----------------------------------------------------------------------------- similarity_lse

using LseFn = Tensor5(const Tensor&, const Tensor&, const OptTensor&, double, const OptTensor&, double, Str, int64_t,
                      const OptTensor&, const OptTensor&, bool, bool, Str, int64_t, bool, int64_t);
using LseBwdFn = Tensor4(const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&, double,
                         const OptTensor&, double, Str, int64_t, const OptTensor&, const OptTensor&, bool, bool, Str,
                         int64_t, bool, int64_t, const Tensor&, const Tensor&, const Tensor&, bool, bool, bool, bool);

struct LseBackwardFunction : public torch::autograd::Function<LseBackwardFunction> {
  static variable_list forward(AutogradContext*, const OptTensor& gr, const OptTensor& gc, const Tensor& x,
                               const Tensor& y, const OptTensor& scale, double sv, const OptTensor& bias, double bv,
                               Str exclude, int64_t offset, const OptTensor& xl, const OptTensor& yl, bool rows,
                               bool cols, Str backend, int64_t chunk, bool det, int64_t budget, const Tensor& rs,
                               const Tensor& cs, const Tensor& logits, bool nx, bool ny, bool ns, bool nb) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<LseBwdFn>("mmloss_C::similarity_lse_backward");
    auto r = op.call(gr, gc, x, y, scale, sv, bias, bv, exclude, offset, xl, yl, rows, cols, backend, chunk, det,
                     budget, rs, cs, logits, nx, ny, ns, nb);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  }
  static variable_list backward(AutogradContext*, variable_list) { double_backward_error(); }
};

Tensor4 similarity_lse_backward_autograd(const OptTensor& gr, const OptTensor& gc, const Tensor& x, const Tensor& y,
                                         const OptTensor& scale, double sv, const OptTensor& bias, double bv,
                                         Str exclude, int64_t offset, const OptTensor& xl, const OptTensor& yl,
                                         bool rows, bool cols, Str backend, int64_t chunk, bool det, int64_t budget,
                                         const Tensor& rs, const Tensor& cs, const Tensor& logits, bool nx, bool ny,
                                         bool ns, bool nb) {
  auto r = LseBackwardFunction::apply(gr, gc, x, y, scale, sv, bias, bv, exclude, offset, xl, yl, rows, cols, backend,
                                      chunk, det, budget, rs, cs, logits, nx, ny, ns, nb);
  return {r[0], r[1], r[2], r[3]};
}

struct LseFunction : public torch::autograd::Function<LseFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, const OptTensor& scale,
                               double sv, const OptTensor& bias, double bv, Str exclude, int64_t offset,
                               const OptTensor& xl, const OptTensor& yl, bool rows, bool cols, Str backend,
                               int64_t chunk, bool det, int64_t budget) {
    Tensor5 r;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = op_handle<LseFn>("mmloss_C::similarity_lse");
      r = op.call(x, y, scale, sv, bias, bv, exclude, offset, xl, yl, rows, cols, backend, chunk, det, budget);
    }
    auto& [row, col, rs, cs, logits] = r;
    ctx->mark_non_differentiable({rs, cs, logits});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, y, opt_or_undef(scale), opt_or_undef(bias), opt_or_undef(xl), opt_or_undef(yl), rs,
                            cs, logits});
    Edges e;
    const int ex = e.add(true), ey = e.add(true), es = e.add(defined(scale)), eb = e.add(defined(bias));
    // Four entries (not one per argument): each saved_data entry costs a string hash and an
    // allocation, which shows at small sizes. "i": edges of x, y, scale, bias, then offset, rows,
    // cols, chunk, det, budget; "f": scale_value, bias_value; "e": exclude; "b": backend.
    ctx->saved_data["i"] = std::vector<int64_t>{ex, ey, es, eb, offset, rows, cols, chunk, det, budget};
    ctx->saved_data["f"] = std::vector<double>{sv, bv};
    ctx->saved_data["e"] = std::string(exclude);
    ctx->saved_data["b"] = std::string(backend);
    return {row, col, rs, cs, logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto iv = ctx->saved_data["i"].toIntVector();
    const auto fv = ctx->saved_data["f"].toDoubleVector();
    const bool nx = needs(ctx, iv[0]), ny = needs(ctx, iv[1]), ns = needs(ctx, iv[2]), nb = needs(ctx, iv[3]);
    const int64_t offset = iv[4], chunk = iv[7], budget = iv[9];
    const bool rows = iv[5] != 0, cols = iv[6] != 0, det = iv[8] != 0;
    OptTensor gr = rows ? undef_to_opt(grads[0]) : OptTensor();
    OptTensor gc = cols ? undef_to_opt(grads[1]) : OptTensor();
    variable_list out(16);
    if ((!gr && !gc) || !(nx || ny || ns || nb)) return out;
    auto s = ctx->get_saved_variables();
    const std::string& exclude = ctx->saved_data["e"].toStringRef();
    const std::string& backend = ctx->saved_data["b"].toStringRef();
    static auto op = op_handle<LseBwdFn>("mmloss_C::similarity_lse_backward");
    // Below autograd unless a graph of the backward is being built (create_graph=True), where the
    // backward op's autograd kernel records the node that raises on double backward.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto r = op.call(gr, gc, s[0], s[1], undef_to_opt(s[2]), fv[0], undef_to_opt(s[3]), fv[1], exclude, offset,
                     undef_to_opt(s[4]), undef_to_opt(s[5]), rows, cols, backend, chunk, det, budget, s[6], s[7],
                     s[8], nx, ny, ns, nb);
    if (nx) out[0] = std::get<0>(r);
    if (ny) out[1] = std::get<1>(r);
    if (ns) out[2] = std::get<2>(r);
    if (nb) out[4] = std::get<3>(r);
    return out;
  }
};

Tensor5 similarity_lse_autograd(const Tensor& x, const Tensor& y, const OptTensor& scale, double sv,
                                const OptTensor& bias, double bv, Str exclude, int64_t offset, const OptTensor& xl,
                                const OptTensor& yl, bool rows, bool cols, Str backend, int64_t chunk, bool det,
                                int64_t budget) {
  auto r = LseFunction::apply(x, y, scale, sv, bias, bv, exclude, offset, xl, yl, rows, cols, backend, chunk, det,
                              budget);
  return {r[0], r[1], r[2], r[3], r[4]};
}

// ----------------------------------------------------------------------------- pairwise_sigmoid

using SigFn = Tensor(const Tensor&, const Tensor&, const OptTensor&, double, const OptTensor&, double, Str, int64_t,
                     const OptTensor&, const OptTensor&, Str, int64_t, bool);
using SigBwdFn = Tensor4(const OptTensor&, const Tensor&, const Tensor&, const OptTensor&, double, const OptTensor&,
                         double, Str, int64_t, const OptTensor&, const OptTensor&, Str, int64_t, bool, bool, bool,
                         bool, bool);
using SigSumFn = Tensor5(const Tensor&, const Tensor&, const OptTensor&, double, const OptTensor&, double, Str, int64_t,
                         const OptTensor&, const OptTensor&, Str, int64_t, bool, bool, bool, bool, bool);

struct SigBackwardFunction : public torch::autograd::Function<SigBackwardFunction> {
  static variable_list forward(AutogradContext*, const OptTensor& g, const Tensor& x, const Tensor& y,
                               const OptTensor& scale, double sv, const OptTensor& bias, double bv, Str positives,
                               int64_t offset, const OptTensor& xl, const OptTensor& yl, Str backend, int64_t chunk,
                               bool det, bool nx, bool ny, bool ns, bool nb) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<SigBwdFn>("mmloss_C::pairwise_sigmoid_backward");
    auto r = op.call(g, x, y, scale, sv, bias, bv, positives, offset, xl, yl, backend, chunk, det, nx, ny, ns, nb);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  }
  static variable_list backward(AutogradContext*, variable_list) { double_backward_error(); }
};

Tensor4 pairwise_sigmoid_backward_autograd(const OptTensor& g, const Tensor& x, const Tensor& y,
                                           const OptTensor& scale, double sv, const OptTensor& bias, double bv,
                                           Str positives, int64_t offset, const OptTensor& xl, const OptTensor& yl,
                                           Str backend, int64_t chunk, bool det, bool nx, bool ny, bool ns, bool nb) {
  auto r = SigBackwardFunction::apply(g, x, y, scale, sv, bias, bv, positives, offset, xl, yl, backend, chunk, det, nx,
                                      ny, ns, nb);
  return {r[0], r[1], r[2], r[3]};
}

void save_pair_args(AutogradContext* ctx, const Tensor& x, const Tensor& y, const OptTensor& scale, double sv,
                    const OptTensor& bias, double bv, Str marks, int64_t offset, const OptTensor& xl,
                    const OptTensor& yl, Str backend, int64_t chunk, bool det) {
  ctx->save_for_backward({x, y, opt_or_undef(scale), opt_or_undef(bias), opt_or_undef(xl), opt_or_undef(yl)});
  Edges e;
  const int ex = e.add(true), ey = e.add(true), es = e.add(defined(scale)), eb = e.add(defined(bias));
  ctx->saved_data["edges"] = std::vector<int64_t>{ex, ey, es, eb};
  ctx->saved_data["sv"] = sv;
  ctx->saved_data["bv"] = bv;
  ctx->saved_data["marks"] = std::string(marks);
  ctx->saved_data["offset"] = offset;
  ctx->saved_data["backend"] = std::string(backend);
  ctx->saved_data["chunk"] = chunk;
  ctx->saved_data["det"] = det;
}

struct SigFunction : public torch::autograd::Function<SigFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, const OptTensor& scale,
                               double sv, const OptTensor& bias, double bv, Str positives, int64_t offset,
                               const OptTensor& xl, const OptTensor& yl, Str backend, int64_t chunk, bool det) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = op_handle<SigFn>("mmloss_C::pairwise_sigmoid");
      out = op.call(x, y, scale, sv, bias, bv, positives, offset, xl, yl, backend, chunk, det);
    }
    ctx->set_materialize_grads(false);
    save_pair_args(ctx, x, y, scale, sv, bias, bv, positives, offset, xl, yl, backend, chunk, det);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const bool nx = needs(ctx, edges[0]), ny = needs(ctx, edges[1]), ns = needs(ctx, edges[2]),
               nb = needs(ctx, edges[3]);
    variable_list out(13);
    if (!grads[0].defined() || !(nx || ny || ns || nb)) return out;
    auto s = ctx->get_saved_variables();
    const std::string marks = get_str(ctx, "marks"), backend = get_str(ctx, "backend");
    static auto op = op_handle<SigBwdFn>("mmloss_C::pairwise_sigmoid_backward");
    // Below autograd unless a graph of the backward is being built (create_graph=True), where the
    // backward op's autograd kernel records the node that raises on double backward.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto r = op.call(grads[0], s[0], s[1], undef_to_opt(s[2]), get_double(ctx, "sv"), undef_to_opt(s[3]),
                     get_double(ctx, "bv"), marks, get_int(ctx, "offset"), undef_to_opt(s[4]), undef_to_opt(s[5]),
                     backend, get_int(ctx, "chunk"), get_bool(ctx, "det"), nx, ny, ns, nb);
    if (nx) out[0] = std::get<0>(r);
    if (ny) out[1] = std::get<1>(r);
    if (ns) out[2] = std::get<2>(r);
    if (nb) out[4] = std::get<3>(r);
    return out;
  }
};

Tensor pairwise_sigmoid_autograd(const Tensor& x, const Tensor& y, const OptTensor& scale, double sv,
                                 const OptTensor& bias, double bv, Str positives, int64_t offset, const OptTensor& xl,
                                 const OptTensor& yl, Str backend, int64_t chunk, bool det) {
  return SigFunction::apply(x, y, scale, sv, bias, bv, positives, offset, xl, yl, backend, chunk, det)[0];
}

// _schema._register_precomputed: the forward formed the gradients of the total (as its need_*
// arguments asked); backward multiplies them by the upstream scalar, cast to the input dtypes.
struct SigSumFunction : public torch::autograd::Function<SigSumFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, const OptTensor& scale,
                               double sv, const OptTensor& bias, double bv, Str positives, int64_t offset,
                               const OptTensor& xl, const OptTensor& yl, Str backend, int64_t chunk, bool det, bool nx,
                               bool ny, bool ns, bool nb) {
    Tensor5 r;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = op_handle<SigSumFn>("mmloss_C::pairwise_sigmoid_sum");
      r = op.call(x, y, scale, sv, bias, bv, positives, offset, xl, yl, backend, chunk, det, nx, ny, ns, nb);
    }
    auto& [total, gx, gy, gs, gb] = r;
    ctx->mark_non_differentiable({gx, gy, gs, gb});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({gx, gy, gs, gb});
    ctx->saved_data["needs"] = std::vector<bool>{nx, ny, ns && defined(scale), nb && defined(bias)};
    ctx->saved_data["dtypes"] = std::vector<int64_t>{
        static_cast<int64_t>(x.scalar_type()), static_cast<int64_t>(y.scalar_type()),
        static_cast<int64_t>(defined(scale) ? scale->scalar_type() : at::kFloat),
        static_cast<int64_t>(defined(bias) ? bias->scalar_type() : at::kFloat)};
    return {total, gx, gy, gs, gb};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (at::GradMode::is_enabled()) double_backward_error();
    variable_list out(17);
    const Tensor& g = grads[0];
    if (!g.defined()) return out;
    const auto needs_v = ctx->saved_data["needs"].toBoolList();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    auto s = ctx->get_saved_variables();
    const int slots[4] = {0, 1, 2, 4};
    for (int k = 0; k < 4; ++k)
      if (needs_v.get(k)) out[slots[k]] = at::mul(s[k], g).to(static_cast<at::ScalarType>(dtypes[k]));
    return out;
  }
};

Tensor5 pairwise_sigmoid_sum_autograd(const Tensor& x, const Tensor& y, const OptTensor& scale, double sv,
                                      const OptTensor& bias, double bv, Str positives, int64_t offset,
                                      const OptTensor& xl, const OptTensor& yl, Str backend, int64_t chunk, bool det,
                                      bool nx, bool ny, bool ns, bool nb) {
  auto r = SigSumFunction::apply(x, y, scale, sv, bias, bv, positives, offset, xl, yl, backend, chunk, det, nx, ny, ns,
                                 nb);
  return {r[0], r[1], r[2], r[3], r[4]};
}

// ----------------------------------------------------------------------------- similarity_kl

using KlFn = Tensor4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double,
                     const OptTensor&, double, bool, bool, bool, Str, int64_t, bool);
using KlBwdFn = Tensor3(const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const OptTensor&, double, const OptTensor&, double, bool, bool, bool, Str, int64_t, bool,
                        const Tensor&, const Tensor&, bool, bool, bool);

struct KlBackwardFunction : public torch::autograd::Function<KlBackwardFunction> {
  static variable_list forward(AutogradContext*, const OptTensor& gr, const OptTensor& gc, const Tensor& xs,
                               const Tensor& ys, const Tensor& xt, const Tensor& yt, const OptTensor& ss, double ssv,
                               const OptTensor& st, double stv, bool rows, bool cols, bool ce, Str backend,
                               int64_t chunk, bool det, const Tensor& rs, const Tensor& cs, bool nx, bool ny,
                               bool ns) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<KlBwdFn>("mmloss_C::similarity_kl_backward");
    auto r = op.call(gr, gc, xs, ys, xt, yt, ss, ssv, st, stv, rows, cols, ce, backend, chunk, det, rs, cs, nx, ny, ns);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
  static variable_list backward(AutogradContext*, variable_list) { double_backward_error(); }
};

Tensor3 similarity_kl_backward_autograd(const OptTensor& gr, const OptTensor& gc, const Tensor& xs, const Tensor& ys,
                                        const Tensor& xt, const Tensor& yt, const OptTensor& ss, double ssv,
                                        const OptTensor& st, double stv, bool rows, bool cols, bool ce, Str backend,
                                        int64_t chunk, bool det, const Tensor& rs, const Tensor& cs, bool nx, bool ny,
                                        bool ns) {
  auto r = KlBackwardFunction::apply(gr, gc, xs, ys, xt, yt, ss, ssv, st, stv, rows, cols, ce, backend, chunk, det, rs,
                                     cs, nx, ny, ns);
  return {r[0], r[1], r[2]};
}

struct KlFunction : public torch::autograd::Function<KlFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xs, const Tensor& ys, const Tensor& xt,
                               const Tensor& yt, const OptTensor& ss, double ssv, const OptTensor& st, double stv,
                               bool rows, bool cols, bool ce, Str backend, int64_t chunk, bool det) {
    Tensor4 r;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = op_handle<KlFn>("mmloss_C::similarity_kl");
      r = op.call(xs, ys, xt, yt, ss, ssv, st, stv, rows, cols, ce, backend, chunk, det);
    }
    auto& [row, col, rs, cs] = r;
    ctx->mark_non_differentiable({rs, cs});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({xs, ys, xt, yt, opt_or_undef(ss), opt_or_undef(st), rs, cs});
    Edges e;
    const int ex = e.add(true), ey = e.add(true);
    e.add(true), e.add(true);
    const int es = e.add(defined(ss));
    ctx->saved_data["edges"] = std::vector<int64_t>{ex, ey, es};
    ctx->saved_data["ssv"] = ssv;
    ctx->saved_data["stv"] = stv;
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["cols"] = cols;
    ctx->saved_data["ce"] = ce;
    ctx->saved_data["backend"] = std::string(backend);
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["det"] = det;
    return {row, col, rs, cs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const bool nx = needs(ctx, edges[0]), ny = needs(ctx, edges[1]), ns = needs(ctx, edges[2]);
    const bool rows = get_bool(ctx, "rows"), cols = get_bool(ctx, "cols");
    OptTensor gr = rows ? undef_to_opt(grads[0]) : OptTensor();
    OptTensor gc = cols ? undef_to_opt(grads[1]) : OptTensor();
    variable_list out(14);
    if ((!gr && !gc) || !(nx || ny || ns)) return out;
    auto s = ctx->get_saved_variables();
    const std::string backend = get_str(ctx, "backend");
    static auto op = op_handle<KlBwdFn>("mmloss_C::similarity_kl_backward");
    // Below autograd unless a graph of the backward is being built (create_graph=True), where the
    // backward op's autograd kernel records the node that raises on double backward.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto r = op.call(gr, gc, s[0], s[1], s[2], s[3], undef_to_opt(s[4]), get_double(ctx, "ssv"), undef_to_opt(s[5]),
                     get_double(ctx, "stv"), rows, cols, get_bool(ctx, "ce"), backend, get_int(ctx, "chunk"),
                     get_bool(ctx, "det"), s[6], s[7], nx, ny, ns);
    if (nx) out[0] = std::get<0>(r);
    if (ny) out[1] = std::get<1>(r);
    if (ns) out[4] = std::get<2>(r);
    return out;
  }
};

Tensor4 similarity_kl_autograd(const Tensor& xs, const Tensor& ys, const Tensor& xt, const Tensor& yt,
                               const OptTensor& ss, double ssv, const OptTensor& st, double stv, bool rows, bool cols,
                               bool ce, Str backend, int64_t chunk, bool det) {
  auto r = KlFunction::apply(xs, ys, xt, yt, ss, ssv, st, stv, rows, cols, ce, backend, chunk, det);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace
}  // namespace mmloss

TORCH_LIBRARY(mmloss_C, m) {
  for (const char* schema : mmloss::schema::ALL) m.def(schema);
}

TORCH_LIBRARY_IMPL(mmloss_C, CPU, m) {
  m.impl("similarity_lse", &mmloss::cpu::similarity_lse);
  m.impl("similarity_lse_backward", &mmloss::cpu::similarity_lse_backward);
  m.impl("pairwise_sigmoid", &mmloss::cpu::pairwise_sigmoid);
  m.impl("pairwise_sigmoid_backward", &mmloss::cpu::pairwise_sigmoid_backward);
  m.impl("pairwise_sigmoid_sum", &mmloss::cpu::pairwise_sigmoid_sum);
  m.impl("similarity_kl", &mmloss::cpu::similarity_kl);
  m.impl("similarity_kl_backward", &mmloss::cpu::similarity_kl_backward);
}

TORCH_LIBRARY_IMPL(mmloss_C, Meta, m) {
  m.impl("similarity_lse", &mmloss::similarity_lse_meta);
  m.impl("similarity_lse_backward", &mmloss::similarity_lse_backward_meta);
  m.impl("pairwise_sigmoid", &mmloss::pairwise_sigmoid_meta);
  m.impl("pairwise_sigmoid_backward", &mmloss::pairwise_sigmoid_backward_meta);
  m.impl("pairwise_sigmoid_sum", &mmloss::pairwise_sigmoid_sum_meta);
  m.impl("similarity_kl", &mmloss::similarity_kl_meta);
  m.impl("similarity_kl_backward", &mmloss::similarity_kl_backward_meta);
}

TORCH_LIBRARY_IMPL(mmloss_C, Autograd, m) {
  m.impl("similarity_lse", &mmloss::similarity_lse_autograd);
  m.impl("similarity_lse_backward", &mmloss::similarity_lse_backward_autograd);
  m.impl("pairwise_sigmoid", &mmloss::pairwise_sigmoid_autograd);
  m.impl("pairwise_sigmoid_backward", &mmloss::pairwise_sigmoid_backward_autograd);
  m.impl("pairwise_sigmoid_sum", &mmloss::pairwise_sigmoid_sum_autograd);
  m.impl("similarity_kl", &mmloss::similarity_kl_autograd);
  m.impl("similarity_kl_backward", &mmloss::similarity_kl_backward_autograd);
}
