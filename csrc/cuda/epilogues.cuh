// The CUDA backend's epilogue kernels: one pass over a row chunk of the logit matrix that the
// GEMM (cuBLAS through ATen, fp32 output) has just written, reducing it to statistics or
// turning it into the logit gradient G. Interface and layouts: launch.h. Element math:
// csrc/include/mmloss/tile_math.h, the same functions the CPU backend runs and tests.
//
// Geometry: a block of 256 threads (8 warps) owns a TILE_ROWS × TILE_COLS = 32 × 128 tile.
// Lane l of warp w holds columns c0 = tile_col + 4·l … c0 + 3 (one float4) of the rows
// tile_row + w + 8·rr, rr = 0 … 3: 16 values in registers. Row reductions are warp shuffles
// (xor butterfly: every lane ends with the same bits), column reductions go through shared
// memory in warp order. Partials land in fixed slots; combine kernels merge them in slot
// order. Nothing is atomic, so every result is bitwise reproducible.
//
// Exactness: S = s_i·R_ij is one rounded fp32 multiply (__fmul_rn: never contracted into an
// FMA with a later subtraction), so the forward's max and the backward's exp(S − max) see the
// same S at any logit magnitude.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.h"
#include "mmloss/tile_math.h"

namespace mmloss {
namespace cuda {
namespace dev {

using tile::Math;
using F = Math<float>;

constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;
constexpr int ROWS_PER_WARP = TILE_ROWS / WARPS;  // 4
constexpr unsigned FULL_MASK = 0xffffffffu;
static_assert(TILE_COLS == 32 * 4, "one float4 per lane and row");
static_assert(ROWS_PER_WARP * WARPS == TILE_ROWS, "tile rows split evenly over warps");

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

// NaN-propagating max over the warp (torch.amax semantics).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = F::max_nan(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

__device__ __forceinline__ float scale_of(const Scale& s, int64_t row) {
  return s.ptr == nullptr ? s.value : s.ptr[s.per_row ? row : 0];
}

__device__ __forceinline__ float scalar_of(const Scalar& b) { return b.ptr == nullptr ? b.value : *b.ptr; }

// ---------------------------------------------------------------- element type conversions

template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
  static __device__ __forceinline__ void store4(float* p, const float v[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void store4(__half* p, const float v[4]) {
    const __half2 a = __floats2half2_rn(v[0], v[1]);
    const __half2 b = __floats2half2_rn(v[2], v[3]);
    uint2 packed;
    packed.x = *reinterpret_cast<const unsigned*>(&a);
    packed.y = *reinterpret_cast<const unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = packed;
  }
};

template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void store4(__nv_bfloat16* p, const float v[4]) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]);
    const __nv_bfloat162 b = __floats2bfloat162_rn(v[2], v[3]);
    uint2 packed;
    packed.x = *reinterpret_cast<const unsigned*>(&a);
    packed.y = *reinterpret_cast<const unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = packed;
  }
};

// ---------------------------------------------------------------- tile positions and loads

struct TilePos {
  int lane, warp;
  int64_t tc, tr;      // tile column / row index
  int64_t c0;          // first of this lane's 4 columns
  int64_t row[ROWS_PER_WARP];  // chunk rows of this thread
};

__device__ __forceinline__ TilePos tile_pos() {
  TilePos p;
  p.lane = threadIdx.x & 31;
  p.warp = threadIdx.x >> 5;
  p.tc = blockIdx.x;
  p.tr = blockIdx.y;
  p.c0 = p.tc * TILE_COLS + 4 * p.lane;
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) p.row[rr] = p.tr * TILE_ROWS + p.warp + WARPS * rr;
  return p;
}

// Four raw values of chunk row r from column c0 (0 beyond m). The vector path may read the
// padding columns [m, ld) of a workspace row: their values are masked by the caller.
__device__ __forceinline__ void load4(const float* base, int64_t ld, bool vec, int64_t m, int64_t r, int64_t c0,
                                      float v[4]) {
  const float* p = base + r * ld + c0;
  if (vec) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = (c0 + k < m) ? p[k] : 0.0f;
  }
}

__device__ __forceinline__ void store4_chunk(const Chunk& c, int64_t r, int64_t c0, const float v[4]) {
  float* p = c.data + r * c.ld + c0;
  if (c.vec) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (c0 + k < c.m) p[k] = v[k];
  }
}

// The 16 logits of this thread: v[rr][k] = S of (row[rr], c0 + k) = s_i·R (or the stored S
// when prescaled). Bits of `valid` (rr·4 + k): the pair lies inside the chunk; of `marked`:
// the pair is marked (tile::marked with global indices). No −inf is applied here.
struct TileVals {
  float v[ROWS_PER_WARP][4];
  unsigned valid;
  unsigned marked;
};

__device__ __forceinline__ TileVals tile_values(const Chunk& c, const float* data, const Scale& scale,
                                                const Marks& marks, const TilePos& p) {
  TileVals t;
  t.valid = 0u;
  t.marked = 0u;
  int64_t y_label[4] = {0, 0, 0, 0};
  if (marks.kind == tile::MARK_SAME_LABEL) {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (p.c0 + k < c.m) y_label[k] = marks.y_labels[p.c0 + k];
  }
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    const int64_t r = p.row[rr];
    const bool row_ok = r < c.rows && p.c0 < c.m;
    if (!row_ok) {
#pragma unroll
      for (int k = 0; k < 4; ++k) t.v[rr][k] = 0.0f;
      continue;
    }
    const int64_t g = c.row0 + r;
    load4(data, c.ld, c.vec, c.m, r, p.c0, t.v[rr]);
    const float s = c.prescaled ? 1.0f : scale_of(scale, g);
    const int64_t x_label = marks.kind == tile::MARK_SAME_LABEL ? marks.x_labels[g] : 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = p.c0 + k;
      if (j >= c.m) continue;
      if (!c.prescaled) t.v[rr][k] = __fmul_rn(s, t.v[rr][k]);
      const unsigned bit = 1u << (rr * 4 + k);
      t.valid |= bit;
      if (tile::marked(marks.kind, g, j, marks.offset, x_label, y_label[k])) t.marked |= bit;
    }
  }
  return t;
}

__device__ __forceinline__ bool has(unsigned mask, int rr, int k) { return (mask >> (rr * 4 + k)) & 1u; }

// ---------------------------------------------------------------- similarity_lse

__global__ void __launch_bounds__(THREADS) lse_forward_kernel(LseForward a) {
  const TilePos p = tile_pos();
  const Chunk& c = a.chunk;
  TileVals t = tile_values(c, c.data, a.scale, a.marks, p);
  const unsigned allowed = t.valid & ~t.marked;
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr)
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (!has(allowed, rr, k)) t.v[rr][k] = tile::neg_inf<float>();
  if (a.write_back) {
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr)
      if (p.row[rr] < c.rows && p.c0 < c.m) store4_chunk(c, p.row[rr], p.c0, t.v[rr]);
  }
  if (a.row_part != nullptr) {
    const int64_t ntc = gridDim.x;
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
      float mx = t.v[rr][0];
#pragma unroll
      for (int k = 1; k < 4; ++k) mx = F::max_nan(mx, t.v[rr][k]);
      const float shift = tile::finite_or_zero(warp_max(mx));
      float sum = 0.0f;
#pragma unroll
      for (int k = 0; k < 4; ++k) sum += F::exp(t.v[rr][k] - shift);
      sum = warp_sum(sum);
      const int64_t r = p.row[rr];
      if (p.lane == 0 && r < c.rows) {
        a.row_part[(0 * ntc + p.tc) * c.rows + r] = shift;
        a.row_part[(1 * ntc + p.tc) * c.rows + r] = sum;
      }
    }
  }
  if (a.col_part != nullptr) {
    __shared__ float red[WARPS][TILE_COLS];
    __shared__ float col_shift[TILE_COLS];
    const int64_t ntr = gridDim.y;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float mx = t.v[0][k];
#pragma unroll
      for (int rr = 1; rr < ROWS_PER_WARP; ++rr) mx = F::max_nan(mx, t.v[rr][k]);
      red[p.warp][4 * p.lane + k] = mx;
    }
    __syncthreads();
    if (threadIdx.x < TILE_COLS) {
      float mx = red[0][threadIdx.x];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) mx = F::max_nan(mx, red[w][threadIdx.x]);
      col_shift[threadIdx.x] = tile::finite_or_zero(mx);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float shift = col_shift[4 * p.lane + k];
      float sum = 0.0f;
#pragma unroll
      for (int rr = 0; rr < ROWS_PER_WARP; ++rr) sum += F::exp(t.v[rr][k] - shift);
      red[p.warp][4 * p.lane + k] = sum;
    }
    __syncthreads();
    if (threadIdx.x < TILE_COLS) {
      const int64_t j = p.tc * TILE_COLS + threadIdx.x;
      if (j < c.m) {
        float sum = red[0][threadIdx.x];
#pragma unroll
        for (int w = 1; w < WARPS; ++w) sum += red[w][threadIdx.x];
        a.col_part[(0 * ntr + p.tr) * c.m + j] = col_shift[threadIdx.x];
        a.col_part[(1 * ntr + p.tr) * c.m + j] = sum;
      }
    }
  }
}

__global__ void lse_combine_kernel(LseCombine a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < a.rows) {
    if (a.row_stats == nullptr) return;
    const int64_t ntc = tiles(a.m, TILE_COLS);  // 0 when m == 0: the empty record
    tile::LseStats<float> rec = tile::lse_empty<float>();
    for (int64_t tc = 0; tc < ntc; ++tc)
      rec = tile::lse_merge(rec, tile::LseStats<float>{a.row_part[tc * a.rows + idx],
                                                       a.row_part[(ntc + tc) * a.rows + idx]});
    const int64_t g = a.row0 + idx;
    a.row_stats[g] = rec.shift;
    a.row_stats[a.n_total + g] = rec.sum;
    a.row_lse[g] = tile::lse_value(rec.shift, rec.sum, scalar_of(a.bias));
    return;
  }
  const int64_t j = idx - a.rows;
  if (j >= a.m || a.col_stats == nullptr) return;
  const int64_t ntr = tiles(a.rows, TILE_ROWS);
  tile::LseStats<float> rec =
      a.first ? tile::lse_empty<float>() : tile::LseStats<float>{a.col_stats[j], a.col_stats[a.m + j]};
  for (int64_t tr = 0; tr < ntr; ++tr)
    rec = tile::lse_merge(rec, tile::LseStats<float>{a.col_part[tr * a.m + j], a.col_part[(ntr + tr) * a.m + j]});
  a.col_stats[j] = rec.shift;
  a.col_stats[a.m + j] = rec.sum;
  if (a.last) a.col_lse[j] = tile::lse_value(rec.shift, rec.sum, scalar_of(a.bias));
}

template <typename OutT>
__global__ void __launch_bounds__(THREADS) lse_backward_kernel(LseBackward a) {
  const TilePos p = tile_pos();
  const Chunk& c = a.chunk;
  const TileVals t = tile_values(c, c.data, a.scale, a.marks, p);
  const unsigned allowed = t.valid & ~t.marked;
  float col_shift[4] = {0.f, 0.f, 0.f, 0.f}, col_w[4] = {0.f, 0.f, 0.f, 0.f};
  if (a.col_grad != nullptr) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = p.c0 + k;
      if (j < c.m) {
        col_shift[k] = a.col_stats[j];
        col_w[k] = tile::probability_weight(a.col_grad[j], a.col_stats[c.m + j]);
      }
    }
  }
  OutT* g = static_cast<OutT*>(a.g);
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    const int64_t r = p.row[rr];
    if (r >= c.rows || p.c0 >= c.m) continue;
    const int64_t gi = c.row0 + r;
    float row_shift = 0.f, row_w = 0.f;
    if (a.row_grad != nullptr) {
      row_shift = a.row_stats[gi];
      row_w = tile::probability_weight(a.row_grad[gi], a.row_stats[a.n_total + gi]);
    }
    float out[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float v = 0.0f;
      if (has(allowed, rr, k)) {
        if (a.row_grad != nullptr) v += tile::softmax_grad_term(t.v[rr][k], row_shift, row_w);
        if (a.col_grad != nullptr) v += tile::softmax_grad_term(t.v[rr][k], col_shift[k], col_w[k]);
      }
      out[k] = v;
    }
    Cvt<OutT>::store4(g + r * a.ldg + p.c0, out);
  }
}

// ---------------------------------------------------------------- pairwise_sigmoid

__global__ void __launch_bounds__(THREADS) sigmoid_forward_kernel(SigmoidForward a) {
  const TilePos p = tile_pos();
  const Chunk& c = a.chunk;
  const TileVals t = tile_values(c, c.data, a.scale, a.marks, p);
  const float bias = scalar_of(a.bias);
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    float loss = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (has(t.valid, rr, k)) loss += tile::softplus(tile::signed_logit(t.v[rr][k], bias, has(t.marked, rr, k)));
    loss = warp_sum(loss);
    const int64_t r = p.row[rr];
    if (p.lane == 0 && r < c.rows) a.row_part[p.tc * c.rows + r] = loss;
  }
}

template <typename OutT>
__global__ void __launch_bounds__(THREADS) sigmoid_backward_kernel(SigmoidBackward a) {
  const TilePos p = tile_pos();
  const Chunk& c = a.chunk;
  const TileVals t = tile_values(c, c.data, a.scale, a.marks, p);
  const float bias = scalar_of(a.bias);
  const int64_t ntc = gridDim.x;
  OutT* g = static_cast<OutT*>(a.g);
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    const int64_t r = p.row[rr];
    const bool row_ok = r < c.rows;
    const float upstream = (a.row_grad != nullptr && row_ok) ? a.row_grad[c.row0 + r] : 1.0f;
    float out[4];
    float gsum = 0.0f, loss = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[k] = 0.0f;
      if (!has(t.valid, rr, k)) continue;
      const bool positive = has(t.marked, rr, k);
      float sp, sg;
      tile::softplus_sigmoid(tile::signed_logit(t.v[rr][k], bias, positive), sp, sg);
      out[k] = tile::sigmoid_logit_grad(sg, positive) * upstream;
      gsum += out[k];
      loss += sp;
    }
    gsum = warp_sum(gsum);
    if (a.with_loss) loss = warp_sum(loss);
    if (row_ok && p.c0 < c.m) Cvt<OutT>::store4(g + r * a.ldg + p.c0, out);
    if (p.lane == 0 && row_ok) {
      a.row_part[p.tc * c.rows + r] = gsum;
      if (a.with_loss) a.row_part[(ntc + p.tc) * c.rows + r] = loss;
    }
  }
}

__global__ void row_sums_kernel(RowSums a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= a.rows) return;
  const int64_t ntc = tiles(a.m, TILE_COLS);
  for (int f = 0; f < a.fields; ++f) {
    float sum = 0.0f;
    for (int64_t tc = 0; tc < ntc; ++tc) sum += a.row_part[(f * ntc + tc) * a.rows + r];
    a.out[f * a.n_total + a.row0 + r] = sum;
  }
}

// ---------------------------------------------------------------- similarity_kl

enum KlField : int { KL_MAX_S = 0, KL_SUM_S, KL_MAX_T, KL_SUM_T, KL_WEIGHTED, KL_ENTROPY, KL_FIELDS };

__device__ __forceinline__ void kl_store(float* base, int64_t plane, int64_t idx, const tile::KlStats<float>& s) {
  base[KL_MAX_S * plane + idx] = s.max_s;
  base[KL_SUM_S * plane + idx] = s.sum_s;
  base[KL_MAX_T * plane + idx] = s.max_t;
  base[KL_SUM_T * plane + idx] = s.sum_t;
  base[KL_WEIGHTED * plane + idx] = s.weighted;
  base[KL_ENTROPY * plane + idx] = s.entropy;
}

__device__ __forceinline__ tile::KlStats<float> kl_load(const float* base, int64_t plane, int64_t idx) {
  return tile::KlStats<float>{base[KL_MAX_S * plane + idx],    base[KL_SUM_S * plane + idx],
                              base[KL_MAX_T * plane + idx],    base[KL_SUM_T * plane + idx],
                              base[KL_WEIGHTED * plane + idx], base[KL_ENTROPY * plane + idx]};
}

__global__ void __launch_bounds__(THREADS) kl_forward_kernel(KlForward a) {
  const TilePos p = tile_pos();
  const Chunk& c = a.student;
  const Marks none{tile::MARK_NONE, 0, nullptr, nullptr};
  const TileVals s = tile_values(c, c.data, a.scale_s, none, p);
  const TileVals t = tile_values(c, a.teacher, a.scale_t, none, p);
  const float ninf = tile::neg_inf<float>();
  if (a.row_part != nullptr) {
    const int64_t ntc = gridDim.x;
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
      float ms = ninf, mt = ninf;
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (has(s.valid, rr, k)) {
          ms = F::max_nan(ms, s.v[rr][k]);
          mt = F::max_nan(mt, t.v[rr][k]);
        }
      ms = warp_max(ms);
      mt = warp_max(mt);
      float sum_s = 0.f, sum_t = 0.f, weighted = 0.f, entropy = 0.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!has(s.valid, rr, k)) continue;
        sum_s += F::exp(s.v[rr][k] - ms);
        const float e = F::exp(t.v[rr][k] - mt);
        sum_t += e;
        weighted += e * (t.v[rr][k] - s.v[rr][k]);
        if (a.cross_entropy) entropy += e * (mt - t.v[rr][k]);
      }
      const tile::KlStats<float> rec{ms, warp_sum(sum_s), mt, warp_sum(sum_t), warp_sum(weighted),
                                     a.cross_entropy ? warp_sum(entropy) : 0.0f};
      const int64_t r = p.row[rr];
      if (p.lane == 0 && r < c.rows) kl_store(a.row_part + p.tc * c.rows + r, ntc * c.rows, 0, rec);
    }
  }
  if (a.col_part != nullptr) {
    __shared__ float red[4][WARPS][TILE_COLS];
    __shared__ float col_max[2][TILE_COLS];
    const int64_t ntr = gridDim.y;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float ms = ninf, mt = ninf;
#pragma unroll
      for (int rr = 0; rr < ROWS_PER_WARP; ++rr)
        if (has(s.valid, rr, k)) {
          ms = F::max_nan(ms, s.v[rr][k]);
          mt = F::max_nan(mt, t.v[rr][k]);
        }
      red[0][p.warp][4 * p.lane + k] = ms;
      red[1][p.warp][4 * p.lane + k] = mt;
    }
    __syncthreads();
    if (threadIdx.x < TILE_COLS) {
      float ms = red[0][0][threadIdx.x], mt = red[1][0][threadIdx.x];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) {
        ms = F::max_nan(ms, red[0][w][threadIdx.x]);
        mt = F::max_nan(mt, red[1][w][threadIdx.x]);
      }
      col_max[0][threadIdx.x] = ms;
      col_max[1][threadIdx.x] = mt;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float ms = col_max[0][4 * p.lane + k], mt = col_max[1][4 * p.lane + k];
      float sum_s = 0.f, sum_t = 0.f, weighted = 0.f, entropy = 0.f;
#pragma unroll
      for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
        if (!has(s.valid, rr, k)) continue;
        sum_s += F::exp(s.v[rr][k] - ms);
        const float e = F::exp(t.v[rr][k] - mt);
        sum_t += e;
        weighted += e * (t.v[rr][k] - s.v[rr][k]);
        if (a.cross_entropy) entropy += e * (mt - t.v[rr][k]);
      }
      red[0][p.warp][4 * p.lane + k] = sum_s;
      red[1][p.warp][4 * p.lane + k] = sum_t;
      red[2][p.warp][4 * p.lane + k] = weighted;
      red[3][p.warp][4 * p.lane + k] = entropy;
    }
    __syncthreads();
    if (threadIdx.x < TILE_COLS) {
      const int64_t j = p.tc * TILE_COLS + threadIdx.x;
      if (j < c.m) {
        float sums[4];
#pragma unroll
        for (int f = 0; f < 4; ++f) {
          sums[f] = red[f][0][threadIdx.x];
#pragma unroll
          for (int w = 1; w < WARPS; ++w) sums[f] += red[f][w][threadIdx.x];
        }
        const tile::KlStats<float> rec{col_max[0][threadIdx.x], sums[0], col_max[1][threadIdx.x], sums[1],
                                       sums[2], sums[3]};
        kl_store(a.col_part + p.tr * c.m + j, ntr * c.m, 0, rec);
      }
    }
  }
}

__global__ void kl_combine_kernel(KlCombine a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  tile::KlStats<float> rec;
  float* out;
  float* stats;
  int64_t plane, at;
  if (idx < a.rows) {
    if (a.row == nullptr) return;
    const int64_t ntc = tiles(a.m, TILE_COLS);
    rec = tile::kl_empty<float>();
    for (int64_t tc = 0; tc < ntc; ++tc) rec = tile::kl_merge(rec, kl_load(a.row_part + tc * a.rows, ntc * a.rows, idx));
    out = a.row;
    stats = a.row_stats;
    plane = a.n_total;
    at = a.row0 + idx;
  } else {
    const int64_t j = idx - a.rows;
    if (j >= a.m || a.col_run == nullptr) return;
    const int64_t ntr = tiles(a.rows, TILE_ROWS);
    rec = a.first ? tile::kl_empty<float>() : kl_load(a.col_run, a.m, j);
    for (int64_t tr = 0; tr < ntr; ++tr) rec = tile::kl_merge(rec, kl_load(a.col_part + tr * a.m, ntr * a.m, j));
    kl_store(a.col_run, a.m, j, rec);
    if (!a.last) return;
    out = a.col;
    stats = a.col_stats;
    plane = a.m;
    at = j;
  }
  const float lse_s = F::log(rec.sum_s) + rec.max_s;
  const float lse_t = F::log(rec.sum_t) + rec.max_t;
  out[at] = tile::kl_divergence(rec.weighted, rec.sum_t, lse_s, lse_t, rec.entropy, a.cross_entropy);
  stats[0 * plane + at] = rec.max_s;
  stats[1 * plane + at] = rec.sum_s;
  stats[2 * plane + at] = rec.max_t;
  stats[3 * plane + at] = rec.sum_t;
}

template <typename OutT>
__global__ void __launch_bounds__(THREADS) kl_backward_kernel(KlBackward a) {
  const TilePos p = tile_pos();
  const Chunk& c = a.student;
  const Marks none{tile::MARK_NONE, 0, nullptr, nullptr};
  const TileVals s = tile_values(c, c.data, a.scale_s, none, p);
  const TileVals t = tile_values(c, a.teacher, a.scale_t, none, p);
  // (max_s, w_s, max_t, w_t) per column of this lane
  float col[4][4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t j = p.c0 + k;
    col[k][0] = col[k][1] = col[k][2] = col[k][3] = 0.0f;
    if (a.col_grad != nullptr && j < c.m) {
      const float h = a.col_grad[j];
      col[k][0] = a.col_stats[j];
      col[k][1] = h / a.col_stats[c.m + j];
      col[k][2] = a.col_stats[2 * c.m + j];
      col[k][3] = h / a.col_stats[3 * c.m + j];
    }
  }
  OutT* g = static_cast<OutT*>(a.g);
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    const int64_t r = p.row[rr];
    if (r >= c.rows || p.c0 >= c.m) continue;
    const int64_t gi = c.row0 + r;
    float row[4] = {0.f, 0.f, 0.f, 0.f};
    if (a.row_grad != nullptr) {
      const float gr = a.row_grad[gi];
      row[0] = a.row_stats[gi];
      row[1] = gr / a.row_stats[a.n_total + gi];
      row[2] = a.row_stats[2 * a.n_total + gi];
      row[3] = gr / a.row_stats[3 * a.n_total + gi];
    }
    float out[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float v = 0.0f;
      if (has(s.valid, rr, k)) {
        const float sv = s.v[rr][k], tv = t.v[rr][k];
        if (a.row_grad != nullptr) v += tile::kl_grad_term(sv, tv, row[0], row[1], row[2], row[3]);
        if (a.col_grad != nullptr) v += tile::kl_grad_term(sv, tv, col[k][0], col[k][1], col[k][2], col[k][3]);
      }
      out[k] = v;
    }
    Cvt<OutT>::store4(g + r * a.ldg + p.c0, out);
  }
}

// ---------------------------------------------------------------- feature gradients

template <typename InT, typename OutT>
__global__ void __launch_bounds__(THREADS) row_grads_kernel(RowGrads a) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * WARPS + (threadIdx.x >> 5);
  if (r >= a.rows) return;
  const int64_t gi = a.row0 + r;
  const float s = scale_of(a.scale, gi);
  const InT* x = static_cast<const InT*>(a.x) + r * a.d;
  const float* arow = a.a == nullptr ? nullptr : a.a + r * a.d;
  OutT* dx = a.dx == nullptr ? nullptr : static_cast<OutT*>(a.dx) + r * a.d;
  InT* xs = a.xs == nullptr ? nullptr : static_cast<InT*>(a.xs) + r * a.d;
  float dot = 0.0f;
  for (int64_t k = lane; k < a.d; k += 32) {
    const float xv = Cvt<InT>::to_float(x[k]);
    if (arow != nullptr) {
      const float av = arow[k];
      dot = fmaf(xv, av, dot);
      if (dx != nullptr) dx[k] = Cvt<OutT>::from_float(s * av);
    }
    if (xs != nullptr) xs[k] = Cvt<InT>::from_float(s * xv);
  }
  if (a.dscale != nullptr) {
    dot = warp_sum(dot);
    if (lane == 0) a.dscale[gi] = dot;
  }
}

constexpr int SUM_THREADS = 512;

__global__ void __launch_bounds__(SUM_THREADS) ordered_sum_kernel(OrderedSum a) {
  __shared__ float red[SUM_THREADS];
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < a.n; i += SUM_THREADS)
    acc += a.gate_a == nullptr ? a.a[i] : tile::allowed_grad(a.a[i], a.gate_a[i]);
  if (a.b != nullptr)
    for (int64_t i = threadIdx.x; i < a.m; i += SUM_THREADS)
      acc += a.gate_b == nullptr ? a.b[i] : tile::allowed_grad(a.b[i], a.gate_b[i]);
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int half = SUM_THREADS / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) a.out[0] = red[0];
}

}  // namespace dev
}  // namespace cuda
}  // namespace mmloss
