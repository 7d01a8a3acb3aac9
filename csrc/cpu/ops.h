// The CPU kernels of the mmloss_C ops (ops.cpp): signatures exactly as the schemas in
// csrc/include/mmloss/schema.h, which the registration (csrc/register.cpp) binds them to.
#pragma once

#include <utility>

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace mmloss {
namespace cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Str = c10::string_view;

using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

Tensor5 similarity_lse(const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
                       const OptTensor& bias, double bias_value, Str exclude, int64_t offset,
                       const OptTensor& x_labels, const OptTensor& y_labels, bool rows, bool cols, Str backend,
                       int64_t chunk_size, bool deterministic, int64_t logit_budget);

Tensor4 similarity_lse_backward(const OptTensor& grad_row_lse, const OptTensor& grad_col_lse, const Tensor& x,
                                const Tensor& y, const OptTensor& scale, double scale_value, const OptTensor& bias,
                                double bias_value, Str exclude, int64_t offset, const OptTensor& x_labels,
                                const OptTensor& y_labels, bool rows, bool cols, Str backend, int64_t chunk_size,
                                bool deterministic, int64_t logit_budget, const Tensor& row_stats,
                                const Tensor& col_stats, const Tensor& logits, bool need_x, bool need_y,
                                bool need_scale, bool need_bias);

Tensor pairwise_sigmoid(const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
                        const OptTensor& bias, double bias_value, Str positives, int64_t offset,
                        const OptTensor& x_labels, const OptTensor& y_labels, Str backend, int64_t chunk_size,
                        bool deterministic);

Tensor4 pairwise_sigmoid_backward(const OptTensor& grad_rows, const Tensor& x, const Tensor& y,
                                  const OptTensor& scale, double scale_value, const OptTensor& bias,
                                  double bias_value, Str positives, int64_t offset, const OptTensor& x_labels,
                                  const OptTensor& y_labels, Str backend, int64_t chunk_size, bool deterministic,
                                  bool need_x, bool need_y, bool need_scale, bool need_bias);

Tensor5 pairwise_sigmoid_sum(const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
                             const OptTensor& bias, double bias_value, Str positives, int64_t offset,
                             const OptTensor& x_labels, const OptTensor& y_labels, Str backend, int64_t chunk_size,
                             bool deterministic, bool need_x, bool need_y, bool need_scale, bool need_bias);

Tensor4 similarity_kl(const Tensor& x_s, const Tensor& y_s, const Tensor& x_t, const Tensor& y_t,
                      const OptTensor& scale_s, double scale_s_value, const OptTensor& scale_t, double scale_t_value,
                      bool rows, bool cols, bool cross_entropy, Str backend, int64_t chunk_size, bool deterministic);

Tensor3 similarity_kl_backward(const OptTensor& grad_row, const OptTensor& grad_col, const Tensor& x_s,
                               const Tensor& y_s, const Tensor& x_t, const Tensor& y_t, const OptTensor& scale_s,
                               double scale_s_value, const OptTensor& scale_t, double scale_t_value, bool rows,
                               bool cols, bool cross_entropy, Str backend, int64_t chunk_size, bool deterministic,
                               const Tensor& row_stats, const Tensor& col_stats, bool need_x_s, bool need_y_s,
                               bool need_scale_s);

// The blocks (rows, columns) the similarity_lse / pairwise_sigmoid passes cut an (n × m)
// logit matrix into, for d features of elem bytes (chunk_size > 0 sets both edges).
std::pair<int64_t, int64_t> logit_blocks(int64_t n, int64_t m, int64_t d, int64_t elem, int64_t chunk_size);

// The epilogue instruction set in use ("avx512", "avx2" or "default"; MMLOSS_CPU_ISA forces
// one) and the ones compiled in.
const char* epilogue_isa();
const char* epilogue_isas_built();

}  // namespace cpu
}  // namespace mmloss
