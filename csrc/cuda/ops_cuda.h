// The CUDA kernels of the mmloss_C ops (registered in ops_cuda.cpp with
// TORCH_LIBRARY_IMPL(mmloss_C, CUDA, m)). Their C++ signatures follow the schemas of
// csrc/include/mmloss/schema.h argument for argument (Tensor? → optional, float → double,
// int → int64_t, str → c10::string_view); scripts/compile_cuda.sh checks that they do
// (tests/cuda_compile/signatures.cpp) without a GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace mmloss {
namespace cuda {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> similarity_lse(
    const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value, const OptTensor& bias,
    double bias_value, c10::string_view exclude, int64_t offset, const OptTensor& x_labels,
    const OptTensor& y_labels, bool rows, bool cols, c10::string_view backend, int64_t chunk_size,
    bool deterministic, int64_t logit_budget);

std::tuple<Tensor, Tensor, Tensor, Tensor> similarity_lse_backward(
    const OptTensor& grad_row_lse, const OptTensor& grad_col_lse, const Tensor& x, const Tensor& y,
    const OptTensor& scale, double scale_value, const OptTensor& bias, double bias_value, c10::string_view exclude,
    int64_t offset, const OptTensor& x_labels, const OptTensor& y_labels, bool rows, bool cols,
    c10::string_view backend, int64_t chunk_size, bool deterministic, int64_t logit_budget, const Tensor& row_stats,
    const Tensor& col_stats, const Tensor& logits, bool need_x, bool need_y, bool need_scale, bool need_bias);

Tensor pairwise_sigmoid(const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
                        const OptTensor& bias, double bias_value, c10::string_view positives, int64_t offset,
                        const OptTensor& x_labels, const OptTensor& y_labels, c10::string_view backend,
                        int64_t chunk_size, bool deterministic);

std::tuple<Tensor, Tensor, Tensor, Tensor> pairwise_sigmoid_backward(
    const OptTensor& grad_rows, const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value,
    const OptTensor& bias, double bias_value, c10::string_view positives, int64_t offset, const OptTensor& x_labels,
    const OptTensor& y_labels, c10::string_view backend, int64_t chunk_size, bool deterministic, bool need_x,
    bool need_y, bool need_scale, bool need_bias);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pairwise_sigmoid_sum(
    const Tensor& x, const Tensor& y, const OptTensor& scale, double scale_value, const OptTensor& bias,
    double bias_value, c10::string_view positives, int64_t offset, const OptTensor& x_labels,
    const OptTensor& y_labels, c10::string_view backend, int64_t chunk_size, bool deterministic, bool need_x,
    bool need_y, bool need_scale, bool need_bias);

std::tuple<Tensor, Tensor, Tensor, Tensor> similarity_kl(
    const Tensor& x_s, const Tensor& y_s, const Tensor& x_t, const Tensor& y_t, const OptTensor& scale_s,
    double scale_s_value, const OptTensor& scale_t, double scale_t_value, bool rows, bool cols, bool cross_entropy,
    c10::string_view backend, int64_t chunk_size, bool deterministic);

std::tuple<Tensor, Tensor, Tensor> similarity_kl_backward(
    const OptTensor& grad_row, const OptTensor& grad_col, const Tensor& x_s, const Tensor& y_s, const Tensor& x_t,
    const Tensor& y_t, const OptTensor& scale_s, double scale_s_value, const OptTensor& scale_t,
    double scale_t_value, bool rows, bool cols, bool cross_entropy, c10::string_view backend, int64_t chunk_size,
    bool deterministic, const Tensor& row_stats, const Tensor& col_stats, bool need_x_s, bool need_y_s,
    bool need_scale_s);

}  // namespace cuda
}  // namespace mmloss
