// Launchers of the epilogue kernels (epilogues.cuh) behind the ATen-free interface of
// launch.h. The only template instantiations of the backend live here: the backward tile
// kernels per operand dtype (3 × 3) and the row-gradient kernel per (operand, output) dtype
// pair (5).
#include "epilogues.cuh"

namespace mmloss {
namespace cuda {

namespace {

constexpr int COMBINE_THREADS = 256;

dim3 tile_grid(const Chunk& c) {
  return dim3(static_cast<unsigned>(tiles(c.m, TILE_COLS)), static_cast<unsigned>(tiles(c.rows, TILE_ROWS)));
}

bool empty(const Chunk& c) { return c.rows <= 0 || c.m <= 0; }

unsigned blocks(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

cudaError_t lse_forward(const LseForward& args, cudaStream_t stream) {
  if (empty(args.chunk)) return cudaSuccess;
  dev::lse_forward_kernel<<<tile_grid(args.chunk), dev::THREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t lse_combine(const LseCombine& args, cudaStream_t stream) {
  const int64_t n = args.rows + args.m;
  if (n <= 0) return cudaSuccess;
  dev::lse_combine_kernel<<<blocks(n, COMBINE_THREADS), COMBINE_THREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t lse_backward(const LseBackward& args, DType g_dtype, cudaStream_t stream) {
  if (empty(args.chunk)) return cudaSuccess;
  const dim3 grid = tile_grid(args.chunk);
  switch (g_dtype) {
    case DType::F32: dev::lse_backward_kernel<float><<<grid, dev::THREADS, 0, stream>>>(args); break;
    case DType::F16: dev::lse_backward_kernel<__half><<<grid, dev::THREADS, 0, stream>>>(args); break;
    case DType::BF16: dev::lse_backward_kernel<__nv_bfloat16><<<grid, dev::THREADS, 0, stream>>>(args); break;
  }
  return cudaGetLastError();
}

cudaError_t sigmoid_forward(const SigmoidForward& args, cudaStream_t stream) {
  if (empty(args.chunk)) return cudaSuccess;
  dev::sigmoid_forward_kernel<<<tile_grid(args.chunk), dev::THREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t sigmoid_backward(const SigmoidBackward& args, DType g_dtype, cudaStream_t stream) {
  if (empty(args.chunk)) return cudaSuccess;
  const dim3 grid = tile_grid(args.chunk);
  switch (g_dtype) {
    case DType::F32: dev::sigmoid_backward_kernel<float><<<grid, dev::THREADS, 0, stream>>>(args); break;
    case DType::F16: dev::sigmoid_backward_kernel<__half><<<grid, dev::THREADS, 0, stream>>>(args); break;
    case DType::BF16: dev::sigmoid_backward_kernel<__nv_bfloat16><<<grid, dev::THREADS, 0, stream>>>(args); break;
  }
  return cudaGetLastError();
}

cudaError_t row_sums(const RowSums& args, cudaStream_t stream) {
  if (args.rows <= 0) return cudaSuccess;
  dev::row_sums_kernel<<<blocks(args.rows, COMBINE_THREADS), COMBINE_THREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t kl_forward(const KlForward& args, cudaStream_t stream) {
  if (empty(args.student)) return cudaSuccess;
  dev::kl_forward_kernel<<<tile_grid(args.student), dev::THREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t kl_combine(const KlCombine& args, cudaStream_t stream) {
  const int64_t n = args.rows + args.m;
  if (n <= 0) return cudaSuccess;
  dev::kl_combine_kernel<<<blocks(n, COMBINE_THREADS), COMBINE_THREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t kl_backward(const KlBackward& args, DType g_dtype, cudaStream_t stream) {
  if (empty(args.student)) return cudaSuccess;
  const dim3 grid = tile_grid(args.student);
  switch (g_dtype) {
    case DType::F32: dev::kl_backward_kernel<float><<<grid, dev::THREADS, 0, stream>>>(args); break;
    case DType::F16: dev::kl_backward_kernel<__half><<<grid, dev::THREADS, 0, stream>>>(args); break;
    case DType::BF16: dev::kl_backward_kernel<__nv_bfloat16><<<grid, dev::THREADS, 0, stream>>>(args); break;
  }
  return cudaGetLastError();
}

cudaError_t row_grads(const RowGrads& args, DType x_dtype, cudaStream_t stream) {
  if (args.rows <= 0 || args.d <= 0) return cudaSuccess;
  const unsigned grid = blocks(args.rows, dev::WARPS);
  // dx comes back in the operand dtype, or in fp32 (pairwise_sigmoid_sum's gradients).
  const bool f32_out = args.out_dtype == DType::F32;
  switch (x_dtype) {
    case DType::F32: dev::row_grads_kernel<float, float><<<grid, dev::THREADS, 0, stream>>>(args); break;
    case DType::F16:
      if (f32_out) dev::row_grads_kernel<__half, float><<<grid, dev::THREADS, 0, stream>>>(args);
      else dev::row_grads_kernel<__half, __half><<<grid, dev::THREADS, 0, stream>>>(args);
      break;
    case DType::BF16:
      if (f32_out) dev::row_grads_kernel<__nv_bfloat16, float><<<grid, dev::THREADS, 0, stream>>>(args);
      else dev::row_grads_kernel<__nv_bfloat16, __nv_bfloat16><<<grid, dev::THREADS, 0, stream>>>(args);
      break;
  }
  return cudaGetLastError();
}

cudaError_t ordered_sum(const OrderedSum& args, cudaStream_t stream) {
  dev::ordered_sum_kernel<<<1, dev::SUM_THREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmloss
