// noprop_cuda::local_loss and its backward (semantics: noprop/ops/eager.py).
//
// p = softmax(logits[k, b]) (or the logits themselves when softmax is off: FM's velocity) goes to
// shared memory and the residual r = p·W − W[y_b] + offset[b] (offset optional) is formed in float32
// with lanes over d (W read coalesced). The forward takes 32 rows per block and stages W tiles in
// shared memory (local_loss_tiled_kernel) for m <= 256 classes, one warp per row above that; the
// backward takes one warp per row.
//
// Accuracy: with a softmax, p·W is formed around the row's most likely class a (the pivot):
// p·W = W[a] + u with u = Σ_{c≠a} p_c (W[c] − W[a]), exact because Σ p = 1. The backward's
// softmax term gp_c − Σ_c' p_c' gp_c' becomes coef · r·(W[c] − W[a] − u), also exact. Written the
// textbook way, a confident row (p_a ≈ 1) cancels two large numbers and the fp32 rounding of p_a
// itself is amplified (on an H100, 4x the error of eager's own float32 at m = 100); around the pivot
// p_a never enters, and the error drops below eager's (tests/test_cuda_ext.py's float64 rule).
// The forward reduces rows to loss[k] with a deterministic ATen mean. The backward writes dlogits
// directly and, for dW = Σ_rows (p − onehot(y))ᵀ · (coef · r), two float32 scratch matrices q and gr
// that matmul_tn_in_fixed_order (ordered_sum.cu) contracts in a fixed order: float32 FMAs, no
// atomics and no GEMM (a cuBLAS GEMM follows torch's float32 matmul precision: TF32 under "high").
#include "common.cuh"
#include "ops.h"
#include "ordered_sum.cuh"

namespace noprop_cuda {
namespace {

// Columns a lane handles at once: kCols independent accumulators per lane, so the loop over the m
// classes reads p_c once per kCols columns and keeps kCols FMA chains in flight (one column per lane
// left a warp waiting on each load; 4 columns per lane is 128 per warp pass).
constexpr int kCols = 4;

// The residual for the columns j = j0 + lane + 32·t (t < kCols) of one row: r[t] = (p·W)_j − W[y, j] +
// offset_j, and u[t] the pivot sum (softmax only: p·W = W[a] + u around the pivot class a, see the top
// of the file). Columns ≥ d give r = u = 0. Each column still sums its classes in order c = 0..m−1.
__device__ __forceinline__ void residuals(const float* p, const float* W, const float* wy, const float* off,
                                          bool softmax, int64_t a, int64_t m, int64_t d, int64_t j0, int lane,
                                          float (&r)[kCols], float (&u)[kCols]) {
  int64_t col[kCols];
  bool ok[kCols];
  float wa[kCols], acc[kCols];
#pragma unroll
  for (int t = 0; t < kCols; ++t) {
    col[t] = j0 + lane + static_cast<int64_t>(kWarp) * t;
    ok[t] = col[t] < d;
    wa[t] = ok[t] && softmax ? W[a * d + col[t]] : 0.f;
    acc[t] = 0.f;
  }
  for (int64_t c = 0; c < m; ++c) {
    const float pc = softmax && c == a ? 0.f : p[c];
    const float* wc = W + c * d;
#pragma unroll
    for (int t = 0; t < kCols; ++t) {
      if (ok[t]) acc[t] += pc * (wc[col[t]] - wa[t]);  // wa = 0 without a softmax: plain p·W
    }
  }
#pragma unroll
  for (int t = 0; t < kCols; ++t) {
    const float target = ok[t] ? wy[col[t]] - (off == nullptr ? 0.f : off[col[t]]) : 0.f;
    r[t] = ok[t] ? (softmax ? (wa[t] - target) + acc[t] : acc[t] - target) : 0.f;
    u[t] = acc[t];
  }
}

// row_out[k·B + b] = weight[k(, b)] · ‖r‖².
template <typename L>
__global__ void local_loss_kernel(const L* __restrict__ logits, const float* __restrict__ W,
                                  const int64_t* __restrict__ y, const float* __restrict__ weight, bool w_per_sample,
                                  const float* __restrict__ offset, bool softmax, float* __restrict__ row_out,
                                  int64_t K, int64_t B, int64_t m, int64_t d) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  float* p = smem + warp * m;
  const int64_t n_rows = K * B;
  for (int64_t row = blockIdx.x * warps_per_block + warp; row < n_rows;
       row += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t k = row / B;
    const int64_t b = row - k * B;
    warp_activation_to_smem(logits + row * m, m, p, lane, softmax);
    const float* wy = W + safe_label(y, b, m) * d;
    const float* off = offset == nullptr ? nullptr : offset + b * d;
    const int64_t a = softmax ? warp_argmax_smem(p, m, lane) : 0;
    float sq = 0.f;
    for (int64_t j0 = 0; j0 < d; j0 += kWarp * kCols) {
      float r[kCols], u[kCols];
      residuals(p, W, wy, off, softmax, a, m, d, j0, lane, r, u);
#pragma unroll
      for (int t = 0; t < kCols; ++t) sq += r[t] * r[t];
    }
    sq = warp_sum(sq);
    if (lane == 0) row_out[row] = weight[w_per_sample ? row : k] * sq;
    __syncwarp();  // p is overwritten by this warp's next row
  }
}

// The forward for m <= kTiledMaxClasses: a block takes kTileRows rows and walks d in tiles of
// kTileCols columns, so each W tile is read from global memory once per kTileRows rows (the per-warp
// kernel above re-reads all of W for every row: 31 KB per row at m = 10, d = 784, which bound it on
// an H100). Around the pivot a the residual is a small GEMM:
//   u = p'·W − s·W[a],  p' = p with p_a set to 0,  s = Σ_{c≠a} p_c,
// the same Σ_{c≠a} p_c (W[c] − W[a]) as above, and no term of size p_a ≈ 1 ever enters: the error is
// ~eps·s·|W| (the per-row kernel subtracts W[a] term by term and can do better when W's rows share a
// large common part; both stay well inside eager's float32 error). Without a softmax p' = logits,
// s = 0 and the pivot terms drop out. Launch with kTileWarps warps (the row ownership below).
// Shared memory: p' [kTileRows, m] and a [kClassChunk, kTileCols] chunk of the W tile. Warp w owns
// rows 4w..4w+3 of the block (softmax and pivot with 8 lanes per row, then the final sums); in the
// GEMM lane l owns columns l + 32·t of all four.
// Per tile the block reads m·kTileCols floats of W (L2) and gathers W[a], W[y] (and the offset)
// for its rows from L1/L2; logits are read once. Global traffic is ~K·B·m·elt: FMA-bound.
constexpr int kTileRows = 32;
constexpr int kRowsPerWarp = 4;
constexpr int kTileWarps = kTileRows / kRowsPerWarp;  // 8 warps, 256 threads
constexpr int kTileCols = kWarp * kCols;              // 128
constexpr int kClassChunk = 32;
constexpr int64_t kTiledMaxClasses = 256;  // p' then needs 32 KB of shared memory, the W chunk 16 KB

constexpr int kRowLanes = kWarp / kRowsPerWarp;  // 8 lanes per row in the tiled kernel's row phase

struct RowPrep {
  int64_t wa_off, wy_off, off_row;  // W[a], W[y] and offset row starts (elements)
  float s;                          // Σ_{c≠a} p_c (softmax), 0 otherwise
};

// One row of the tiled kernel, by its 8 lanes (sub = 0..7; the group_* reductions of common.cuh over
// 8 lanes, which every lane of the warp calls, dead rows included): p' = activation with p_a zeroed
// into p[0..m), and the row's pivot offsets. A row past the end (row >= n_rows) gets p' = 0.
template <typename L>
__device__ __forceinline__ RowPrep prepare_row(const L* logits, const int64_t* y, bool softmax, int64_t row, float* p,
                                               int sub, int64_t n_rows, int64_t B, int64_t m, int64_t d) {
  const bool live = row < n_rows;
  const int64_t n = live ? m : 0;  // a dead row loops over nothing but still joins the shuffles
  const L* x = logits + (live ? row : 0) * m;
  float mx = -INFINITY;
  for (int64_t c = sub; c < n; c += kRowLanes) {
    const float v = to_f32(x[c]);
    p[c] = v;
    mx = fmaxf(mx, v);
  }
  RowPrep out{0, 0, 0, 0.f};
  if (softmax) {
    mx = group_max<kRowLanes>(mx);
    float sum = 0.f;
    for (int64_t c = sub; c < n; c += kRowLanes) {
      const float e = expf(p[c] - mx);
      p[c] = e;
      sum += e;
    }
    const float inv = 1.f / group_sum<kRowLanes>(sum);
    // argmax (smallest index on ties; a row of NaNs has none and takes pivot 0, whose NaNs spread)
    float best = -INFINITY;
    int64_t arg = m;
    for (int64_t c = sub; c < n; c += kRowLanes) {
      p[c] *= inv;
      if (p[c] > best) { best = p[c]; arg = c; }
    }
    group_argmax<kRowLanes>(best, arg);
    const int64_t a = arg < m ? arg : 0;
    float part = 0.f;
    for (int64_t c = sub; c < n; c += kRowLanes) part += c == a ? 0.f : p[c];
    out.s = group_sum<kRowLanes>(part);
    out.wa_off = a * d;
    __syncwarp();  // every lane has read p[a] before it is zeroed
    if (live && sub == 0) p[a] = 0.f;
  }
  if (!live) {
    for (int64_t c = sub; c < m; c += kRowLanes) p[c] = 0.f;  // a dead row adds nothing to the GEMM
  } else {
    const int64_t b = row % B;
    out.wy_off = safe_label(y, b, m) * d;
    out.off_row = b * d;
  }
  return out;
}

template <typename L>
__global__ void __launch_bounds__(kTileWarps * kWarp)
    local_loss_tiled_kernel(const L* __restrict__ logits, const float* __restrict__ W, const int64_t* __restrict__ y,
                            const float* __restrict__ weight, bool w_per_sample, const float* __restrict__ offset,
                            bool softmax, float* __restrict__ row_out, int64_t K, int64_t B, int64_t m, int64_t d) {
  extern __shared__ float smem[];
  float* wt = smem;                           // [kClassChunk, kTileCols]
  float* pp = smem + kClassChunk * kTileCols;  // [kTileRows, m]
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t n_rows = K * B;
  const int64_t n_groups = ceil_div(n_rows, kTileRows);
  for (int64_t group = blockIdx.x; group < n_groups; group += gridDim.x) {
    // p' into shared memory, the pivot a and s = Σ_{c≠a} p_c for this warp's 4 rows at once: each row
    // gets 8 lanes (lane / 8 = the row), so a reduction is 3 shuffle steps and no lane idles at
    // m = 10 (a whole warp per row took four rounds of 5-step reductions, bounding small d).
    const int my_row = warp * kRowsPerWarp + lane / kRowLanes;  // within the block's kTileRows
    const RowPrep mine = prepare_row(logits, y, softmax, group * kTileRows + my_row, pp + my_row * m, lane % kRowLanes,
                                     n_rows, B, m, d);
    int64_t wa_off[kRowsPerWarp], wy_off[kRowsPerWarp], off_row[kRowsPerWarp];
    float s[kRowsPerWarp];
    bool live[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {  // every lane learns every row's values from the row's first lane
      const int src = i * kRowLanes;
      wa_off[i] = __shfl_sync(kFullMask, mine.wa_off, src);
      wy_off[i] = __shfl_sync(kFullMask, mine.wy_off, src);
      off_row[i] = __shfl_sync(kFullMask, mine.off_row, src);
      s[i] = __shfl_sync(kFullMask, mine.s, src);
      live[i] = group * kTileRows + warp * kRowsPerWarp + i < n_rows;
    }
    float sq[kRowsPerWarp] = {};
    for (int64_t j0 = 0; j0 < d; j0 += kTileCols) {
      float acc[kRowsPerWarp][kCols] = {};
      for (int64_t c0 = 0; c0 < m; c0 += kClassChunk) {
        const int n_c = static_cast<int>(m - c0 < kClassChunk ? m - c0 : kClassChunk);
        __syncthreads();  // the previous chunk is consumed (and, the first time, p' is written)
        for (int cc = warp; cc < n_c; cc += kTileWarps) {  // warps over classes, lanes over columns
#pragma unroll
          for (int t = 0; t < kCols; ++t) {
            const int jj = lane + kWarp * t;
            wt[cc * kTileCols + jj] = j0 + jj < d ? W[(c0 + cc) * d + j0 + jj] : 0.f;
          }
        }
        __syncthreads();
        for (int cc = 0; cc < n_c; ++cc) {
          float w[kCols], pc[kRowsPerWarp];
#pragma unroll
          for (int t = 0; t < kCols; ++t) w[t] = wt[cc * kTileCols + lane + kWarp * t];
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) pc[i] = pp[(warp * kRowsPerWarp + i) * m + c0 + cc];
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
            for (int t = 0; t < kCols; ++t) acc[i][t] += pc[i] * w[t];  // classes in order c = 0..m−1
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int t = 0; t < kCols; ++t) {
          const int64_t j = j0 + lane + kWarp * t;
          if (!live[i] || j >= d) continue;
          const float target = W[wy_off[i] + j] - (offset == nullptr ? 0.f : offset[off_row[i] + j]);
          float r;
          if (softmax) {
            const float wa = W[wa_off[i] + j];
            r = (wa - target) + (acc[i][t] - s[i] * wa);
          } else {
            r = acc[i][t] - target;
          }
          sq[i] += r * r;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const float total = warp_sum(sq[i]);
      const int64_t row = group * kTileRows + warp * kRowsPerWarp + i;
      if (lane == 0 && live[i]) row_out[row] = weight[w_per_sample ? row : row / B] * total;
    }
    // No barrier needed before the next group: a warp reads only its own rows of p', and the W chunk
    // is rewritten only after the __syncthreads at the top of the chunk loop.
  }
}

// The backward's per-class sums g[c] = coef · Σ_j r_j·(...) take lanes over classes up to this many
// columns: a warp reduction per class (5 dependent shuffles, m of them in a row) bounded small d (run 2:
// 0.119 ms against Triton's 0.058 at d = 10, m = 10); past it, lanes over columns keep W coalesced.
constexpr int64_t kClassLanesMaxD = 64;

// Per row: dlogits, q = p − onehot(y), gr = coef · r, dweight_rows = grad_loss[k] · ‖r‖² / B,
// with coef = 2 / B · grad_loss[k] · weight[k(, b)]. Shared memory per warp: p [m], g [m], r [d],
// u [d] (the pivot sum, softmax only).
template <typename L>
__global__ void local_loss_backward_kernel(const float* __restrict__ grad_loss, const L* __restrict__ logits,
                                           const float* __restrict__ W, const int64_t* __restrict__ y,
                                           const float* __restrict__ weight, bool w_per_sample,
                                           const float* __restrict__ offset, bool softmax, L* __restrict__ dlogits, float* __restrict__ q, float* __restrict__ gr,
                                           float* __restrict__ dweight_rows, int64_t K, int64_t B, int64_t m,
                                           int64_t d) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  float* p = smem + warp * (2 * m + 2 * d);
  float* g = p + m;
  float* r = g + m;
  float* u = r + d;
  const int64_t n_rows = K * B;
  const float inv_B = 1.f / static_cast<float>(B);
  for (int64_t row = blockIdx.x * warps_per_block + warp; row < n_rows;
       row += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t k = row / B;
    const int64_t b = row - k * B;
    warp_activation_to_smem(logits + row * m, m, p, lane, softmax);
    const int64_t label = safe_label(y, b, m);
    const float* wy = W + label * d;
    const float* off = offset == nullptr ? nullptr : offset + b * d;
    const float gl = grad_loss[k];
    const float coef = 2.f * inv_B * gl * weight[w_per_sample ? row : k];
    const int64_t a = softmax ? warp_argmax_smem(p, m, lane) : 0;
    const float* wa = W + a * d;
    float sq = 0.f;
    for (int64_t j0 = 0; j0 < d; j0 += kWarp * kCols) {
      float rt[kCols], ut[kCols];
      residuals(p, W, wy, off, softmax, a, m, d, j0, lane, rt, ut);
#pragma unroll
      for (int t = 0; t < kCols; ++t) {
        const int64_t j = j0 + lane + static_cast<int64_t>(kWarp) * t;
        if (j < d) {
          r[j] = rt[t];
          u[j] = ut[t];
          sq += rt[t] * rt[t];
          gr[row * d + j] = coef * rt[t];
        }
      }
    }
    sq = warp_sum(sq);
    if (lane == 0) dweight_rows[row] = gl * sq * inv_B;
    __syncwarp();  // r, u complete before every lane reads all of them
    // Without a softmax g[c] = dL/dp_c = coef · r·W[c] is dlogits itself. With it, dlogits_c =
    // p_c (gp_c − Σ_c' p_c' gp_c') and g[c] holds the bracket, coef · r·(W[c] − W[a] − u).
    if (d <= kClassLanesMaxD) {  // few columns: lanes over classes, one serial dot product each, no shuffles
      for (int64_t c = lane; c < m; c += kWarp) {
        const float* wc = W + c * d;
        float part = 0.f;
        if (softmax) {
          for (int64_t j = 0; j < d; ++j) part += r[j] * ((wc[j] - wa[j]) - u[j]);
        } else {
          for (int64_t j = 0; j < d; ++j) part += r[j] * wc[j];
        }
        g[c] = coef * part;
      }
    } else {  // lanes over columns, one warp reduction per class
      for (int64_t c = 0; c < m; ++c) {
        float part = 0.f;
        if (softmax) {
          for (int64_t j = lane; j < d; j += kWarp) part += r[j] * ((W[c * d + j] - wa[j]) - u[j]);
        } else {
          for (int64_t j = lane; j < d; j += kWarp) part += r[j] * W[c * d + j];
        }
        const float gc = coef * warp_sum(part);
        if (lane == (c % kWarp)) g[c] = gc;
      }
    }
    __syncwarp();
    for (int64_t c = lane; c < m; c += kWarp) {
      dlogits[row * m + c] = from_f32<L>(softmax ? p[c] * g[c] : g[c]);
      q[row * m + c] = p[c] - (c == label ? 1.f : 0.f);
    }
    __syncwarp();  // p, g, r, u are overwritten by this warp's next row
  }
}

struct Inputs {
  at::Tensor logits, W32, y, weight32, offset32;  // offset32 undefined when there is no offset
  int64_t K, B, m, d;
  const float* offset_ptr() const { return offset32.defined() ? offset32.data_ptr<float>() : nullptr; }
};

// Checks everything, then converts W, weight and offset to contiguous float32 on logits' device.
Inputs check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& W, const at::Tensor& y,
                    const at::Tensor& weight, const std::optional<at::Tensor>& offset) {
  check_cuda_float(logits, op, "logits", 3);
  check_cuda_float(W, op, "W", 2);
  check_same_device(op, {&logits, &W, &y, &weight});
  const int64_t K = logits.size(0), B = logits.size(1), m = logits.size(2);
  TORCH_CHECK(K > 0 && B > 0 && m > 0, op, ": logits [K, B, m] must be non-empty, got shape ", logits.sizes());
  TORCH_CHECK(W.size(0) == m, op, ": logits has m = ", m, " classes but W has ", W.size(0),
              " rows (W must be [m, d])");
  check_labels(y, op, B);
  check_cuda_float(weight, op, "weight", 1, 2);
  at::Tensor offset32;
  if (offset.has_value() && offset->defined()) {
    check_cuda_float(*offset, op, "offset", 2);
    check_same_device(op, {&logits, &*offset});
    TORCH_CHECK(offset->size(0) == B && offset->size(1) == W.size(1), op, ": offset must have shape [B, d] = [", B,
                ", ", W.size(1), "], got ", offset->sizes());
    offset32 = offset->to(at::kFloat).contiguous();
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  return {logits.contiguous(), W.to(at::kFloat).contiguous(), y.to(at::kLong).contiguous(),
          coefficient_f32(weight, op, "weight", K, B), offset32, K, B, m, W.size(1)};
}

constexpr int64_t kMaxSmemFloats = 48 * 1024 / sizeof(float);  // default dynamic shared-memory limit

}  // namespace

at::Tensor local_loss(const at::Tensor& logits, const at::Tensor& W, const at::Tensor& y, const at::Tensor& weight,
                      const std::optional<at::Tensor>& offset, bool softmax) {
  constexpr const char* op = "noprop_cuda::local_loss";
  const Inputs in = check_inputs(op, logits, W, y, weight, offset);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor rows = at::empty({in.K, in.B}, logits.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (in.m <= kTiledMaxClasses) {
    const size_t smem = (kClassChunk * kTileCols + kTileRows * in.m) * sizeof(float);
    NOPROP_DISPATCH_FLOAT(in.logits.scalar_type(), "noprop_cuda::local_loss", [&] {
      local_loss_tiled_kernel<scalar_t><<<grid_for(in.K * in.B, kTileRows), kTileWarps * kWarp, smem, stream>>>(
          in.logits.data_ptr<scalar_t>(), in.W32.data_ptr<float>(), in.y.data_ptr<int64_t>(),
          in.weight32.data_ptr<float>(), in.weight32.dim() == 2, in.offset_ptr(), softmax, rows.data_ptr<float>(),
          in.K, in.B, in.m, in.d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return rows.mean(1);
  }
  TORCH_CHECK(in.m <= kMaxSmemFloats, op, ": the CUDA kernel handles at most ", kMaxSmemFloats,
              " classes, got m = ", in.m, " (use NOPROP_BACKEND=triton or eager)");
  const int warps = warps_for_row(in.m);
  const size_t smem = static_cast<size_t>(warps) * in.m * sizeof(float);
  NOPROP_DISPATCH_FLOAT(in.logits.scalar_type(), "noprop_cuda::local_loss", [&] {
    local_loss_kernel<scalar_t><<<grid_for(in.K * in.B, warps), warps * kWarp, smem, stream>>>(
        in.logits.data_ptr<scalar_t>(), in.W32.data_ptr<float>(), in.y.data_ptr<int64_t>(),
        in.weight32.data_ptr<float>(), in.weight32.dim() == 2, in.offset_ptr(), softmax, rows.data_ptr<float>(), in.K,
        in.B, in.m, in.d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rows.mean(1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_loss_backward(const at::Tensor& grad_loss,
                                                                   const at::Tensor& logits, const at::Tensor& W,
                                                                   const at::Tensor& y, const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& offset,
                                                                   bool softmax) {
  constexpr const char* op = "noprop_cuda::local_loss_backward";
  const Inputs in = check_inputs(op, logits, W, y, weight, offset);
  const c10::cuda::CUDAGuard guard(logits.device());
  check_cuda_float(grad_loss, op, "grad_loss", 1);
  check_same_device(op, {&logits, &grad_loss});
  TORCH_CHECK(grad_loss.size(0) == in.K, op, ": grad_loss must have shape [K] = [", in.K, "], got ",
              grad_loss.sizes());
  const int64_t row_floats = 2 * in.m + 2 * in.d;
  TORCH_CHECK(row_floats <= kMaxSmemFloats, op, ": the CUDA kernel needs 2·m + 2·d <= ", kMaxSmemFloats,
              ", got m = ", in.m, ", d = ", in.d, " (use NOPROP_BACKEND=triton or eager)");
  const at::Tensor gl = grad_loss.to(at::kFloat).contiguous();
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor dlogits = at::empty_like(in.logits);
  at::Tensor q = at::empty({in.K * in.B, in.m}, f32);
  at::Tensor gr = at::empty({in.K * in.B, in.d}, f32);
  at::Tensor dweight_rows = at::empty({in.K, in.B}, f32);
  const int warps = warps_for_row(row_floats);
  const size_t smem = static_cast<size_t>(warps) * row_floats * sizeof(float);
  const auto stream = at::cuda::getCurrentCUDAStream();
  NOPROP_DISPATCH_FLOAT(in.logits.scalar_type(), "noprop_cuda::local_loss_backward", [&] {
    local_loss_backward_kernel<scalar_t><<<grid_for(in.K * in.B, warps), warps * kWarp, smem, stream>>>(
        gl.data_ptr<float>(), in.logits.data_ptr<scalar_t>(), in.W32.data_ptr<float>(), in.y.data_ptr<int64_t>(),
        in.weight32.data_ptr<float>(), in.weight32.dim() == 2, in.offset_ptr(), softmax, dlogits.data_ptr<scalar_t>(),
        q.data_ptr<float>(),
        gr.data_ptr<float>(), dweight_rows.data_ptr<float>(), in.K, in.B, in.m, in.d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor dW = at::empty({in.m, in.d}, W.options());
  matmul_tn_in_fixed_order(q, gr, dW, stream);  // [m, d] = qᵀ · gr
  at::Tensor dweight = weight.dim() == 1 ? dweight_rows.sum(1) : dweight_rows;
  return {dlogits, dW, dweight.to(weight.scalar_type())};
}

}  // namespace noprop_cuda
