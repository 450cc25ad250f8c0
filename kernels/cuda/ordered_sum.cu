// matmul_tn_in_fixed_order (ordered_sum.cuh): local_loss's dW = Σ_rows (p − onehot(y))ᵀ · (coef · r)
// from its two float32 scratch matrices, in float32 FMAs and an order fixed by the shapes.
#include "ordered_sum.cuh"

#include <algorithm>

namespace noprop_cuda {
namespace {

// out = qᵀ · g without atomics, in a fixed order (q [n, m], g [n, d]; c over m is called a class, as
// in local_loss). Block (column tile, class tile, chunk) owns the class_tile x tile_cols outputs of its
// tiles (at most kTnOutputs: kTnPerThread per thread, output o = threadIdx.x + kTnThreads·i) and walks
// the rows of its chunk in increasing order, kTnRows at a time staged in shared memory: each output
// is one FMA chain Σ_row q[row, c]·g[row, j] over the chunk. The chunks' partial sums [chunks, m, d]
// are then added in chunk order by sum_chunks_kernel (ordered_sum.cuh). Per staged row the block reads
// class_tile + tile_cols floats from global memory and does class_tile·tile_cols FMAs from shared
// memory (a warp reads one q value, broadcast, and 32 neighbouring g values: no bank conflicts).
constexpr int kTnThreads = 256;
constexpr int kTnPerThread = 4;
constexpr int kTnOutputs = kTnThreads * kTnPerThread;  // 1024
constexpr int kTnRows = 32;
constexpr int kTnMaxClassTile = 64;  // small d (tile_cols < 16) takes up to 64 classes per block
constexpr int64_t kTnTargetBlocks = 4096;  // as noise_inject.cu: shapes alone fix the order
constexpr int64_t kTnMinChunkRows = 64;    // below that, writing and adding the partials outweighs the rows

__global__ void __launch_bounds__(kTnThreads)
    matmul_tn_partial_kernel(const float* __restrict__ q, const float* __restrict__ g, float* __restrict__ partial,
                             int64_t n, int64_t m, int64_t d, int tile_cols, int class_tile, int64_t chunk_rows) {
  __shared__ float qs[kTnRows * kTnMaxClassTile];  // [kTnRows][class_tile]
  __shared__ float gs[kTnRows * kWarp];            // [kTnRows][tile_cols]
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * tile_cols;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * class_tile;
  const int64_t chunk = blockIdx.z;
  const int64_t row_end = (chunk + 1) * chunk_rows < n ? (chunk + 1) * chunk_rows : n;
  const int cols = static_cast<int>(d - j0 < tile_cols ? d - j0 : tile_cols);
  const int classes = static_cast<int>(m - c0 < class_tile ? m - c0 : class_tile);
  int oc[kTnPerThread], oj[kTnPerThread];
  bool own[kTnPerThread];
  float acc[kTnPerThread];
#pragma unroll
  for (int i = 0; i < kTnPerThread; ++i) {
    const int o = threadIdx.x + kTnThreads * i;
    oc[i] = o / tile_cols;
    oj[i] = o - oc[i] * tile_cols;
    own[i] = oc[i] < classes && oj[i] < cols;
    acc[i] = 0.f;
  }
  for (int64_t r0 = chunk * chunk_rows; r0 < row_end; r0 += kTnRows) {
    const int rows = static_cast<int>(row_end - r0 < kTnRows ? row_end - r0 : kTnRows);
    __syncthreads();  // the previous rows are consumed
    for (int e = threadIdx.x; e < rows * class_tile; e += kTnThreads) {
      const int rr = e / class_tile, c = e - rr * class_tile;
      qs[e] = c < classes ? q[(r0 + rr) * m + c0 + c] : 0.f;
    }
    for (int e = threadIdx.x; e < rows * tile_cols; e += kTnThreads) {
      const int rr = e / tile_cols, jj = e - rr * tile_cols;
      gs[e] = jj < cols ? g[(r0 + rr) * d + j0 + jj] : 0.f;
    }
    __syncthreads();
    for (int rr = 0; rr < rows; ++rr) {  // rows in increasing order
#pragma unroll
      for (int i = 0; i < kTnPerThread; ++i) {
        if (own[i]) acc[i] += qs[rr * class_tile + oc[i]] * gs[rr * tile_cols + oj[i]];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kTnPerThread; ++i) {
    if (own[i]) partial[(chunk * m + c0 + oc[i]) * d + j0 + oj[i]] = acc[i];
  }
}

// Launch geometry of matmul_tn_partial_kernel: tiles of min(d, 32) columns and balanced class
// tiles of at most min(kTnMaxClassTile, kTnOutputs / tile_cols) classes; chunks of the rows enough to
// fill the GPU, at most kMaxChunks and at least kTnMinChunkRows rows each.
struct TnPlan {
  int tile_cols, class_tile;
  int64_t col_tiles, class_tiles, chunks, chunk_rows;
};

TnPlan plan_tn(int64_t n, int64_t m, int64_t d) {
  TnPlan p{};
  p.tile_cols = static_cast<int>(d < kWarp ? d : kWarp);
  const int64_t max_class_tile = std::min<int64_t>(kTnMaxClassTile, kTnOutputs / p.tile_cols);
  p.class_tiles = ceil_div(m, max_class_tile);
  p.class_tile = static_cast<int>(ceil_div(m, p.class_tiles));
  p.col_tiles = ceil_div(d, p.tile_cols);
  int64_t chunks = ceil_div(kTnTargetBlocks, p.col_tiles * p.class_tiles);
  chunks = std::min({chunks, kMaxChunks, std::max<int64_t>(1, n / kTnMinChunkRows)});
  p.chunk_rows = ceil_div(n, chunks);
  p.chunks = ceil_div(n, p.chunk_rows);  // none empty
  return p;
}

}  // namespace

void matmul_tn_in_fixed_order(const at::Tensor& q, const at::Tensor& g, at::Tensor& out, cudaStream_t stream) {
  const int64_t n = q.size(0), m = q.size(1), d = g.size(1);
  if (m == 0 || d == 0) return;
  if (n == 0) {
    out.zero_();
    return;
  }
  const TnPlan plan = plan_tn(n, m, d);
  TORCH_CHECK(plan.class_tiles <= 65535, "matmul_tn_in_fixed_order: m = ", m, " needs ", plan.class_tiles,
              " class tiles, more than the grid's 65535");
  at::Tensor partial = at::empty({plan.chunks, m, d}, q.options());
  const dim3 grid(static_cast<unsigned>(plan.col_tiles), static_cast<unsigned>(plan.class_tiles),
                  static_cast<unsigned>(plan.chunks));
  matmul_tn_partial_kernel<<<grid, kTnThreads, 0, stream>>>(q.data_ptr<float>(), g.data_ptr<float>(),
                                                            partial.data_ptr<float>(), n, m, d, plan.tile_cols,
                                                            plan.class_tile, plan.chunk_rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  NOPROP_DISPATCH_FLOAT(out.scalar_type(), "noprop_cuda::matmul_tn_in_fixed_order", [&] {
    sum_chunks_kernel<scalar_t><<<grid_for(m * d, kWarp), kSumThreads, 0, stream>>>(
        partial.data_ptr<float>(), out.data_ptr<scalar_t>(), plan.chunks, m * d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace noprop_cuda
