// C-style interface between the CUDA kernels of center_region_assign (plain CUDA C++,
// csrc/cuda/center_region_kernel.cu) and their torch registration
// (csrc/cuda/center_region_cuda.cpp). Only raw pointers and sizes cross it, so the .cu
// file compiles with nvcc alone, whatever torch is installed.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace solo_fast {
namespace center_region {

constexpr int kMaxLevels = 8;
constexpr int kMaxStrides = 8;

// Per-instance integer moments and bounds, zeroed by one memset; also the per-thread
// partial sums that reduce into them. Bounds are stored so that 0 means "no pixel yet"
// and a plain max (atomicMax) merges them (rmin = H - rmin_from_end, ...).
struct DeviceStats {
  unsigned long long area, sum_r, sum_c;
  unsigned int rmin_from_end, rmax_plus1, cmin_from_end, cmax_plus1;
};

// Layout of the device table `table` (int64 words, pointers as integers):
//   [0, B)            image b's masks, uint8/bool [M_b, H, W] contiguous
//   [B, 2B)           image b's labels, int64 [M_b]
//   [2B, 3B)          image b's boxes, float64 [M_b, 4], or 0 for the tight boxes
//   [3B, 4B + 1)      first global instance index of image b (prefix sums of M_b)
//   [4B + 1, +B*D)    mask targets of image b, stride k: uint8 [M_b, H/s_k, W/s_k]
//   [.., +B*L)        labels of image b, level l: int64 [S_l, S_l]
struct AssignParams {
  int32_t B, L, D;
  int64_t H, W;
  int64_t total;  // instances in the batch
  int64_t num_classes;
  double pos_scale;
  int32_t grid[kMaxLevels];
  double scale_lo[kMaxLevels], scale_hi[kMaxLevels];
  int64_t cell_offset[kMaxLevels + 1];  // prefix sums of S_l^2 within one image
  int32_t stride[kMaxStrides];
  int64_t max_out;  // largest (H/s)*(W/s) over the strides
  const int64_t* table;
  DeviceStats* stats;  // [total]
  int32_t* owner;      // [B, cell_offset[L]]: instance of each cell, -1 for background
  int32_t* counts;     // [B*L]: positive cells per image and level
};

// Moments, mask targets, cell owners, labels and positive counts of a whole batch: two
// memsets and four kernels on `stream`, no synchronisation.
cudaError_t center_region_assign_launch(const AssignParams& p, cudaStream_t stream);

// Ascending positive cells and their instances, once the host knows the counts.
// `outputs` (device, int64 words): [0, B*L) pos_cells pointers, [B*L, 2*B*L) pos_instance
// pointers, each int64 [counts[b*L + l]]. One kernel.
cudaError_t center_region_compact_launch(const AssignParams& p, const int64_t* outputs, cudaStream_t stream);

}  // namespace center_region
}  // namespace solo_fast
