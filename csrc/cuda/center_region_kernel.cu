// CUDA kernels of solo_fast::center_region_assign (DESIGN.md §2) for a whole batch.
//
// Plain CUDA C++ behind the C-style launchers of common/center_region_launch.h: no
// torch header, so nvcc compiles it on any machine with the CUDA toolkit. The math
// (moments -> centre of mass, scale test, region bounds, bilinear taps) is the header
// shared with the CPU kernel, so the CPU parity tests cover it too.
//
// Launch sequence (one stream, no host synchronisation):
//   memsets      zero the per-instance accumulators and counts, owners to -1
//   moments      one block per (4 mask rows, instance): integer moments and bounds
//   downsample   one thread per (output pixel, instance, distinct stride)
//   region       one thread per (instance, level): atomicMax of the instance index over
//                its cells, which is "the last instance wins" without ordering
//   labels       one thread per cell of the batch: label and per-level positive count
// and, after the host has read the counts, compact: one block per (image, level).
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/center_region.h"
#include "common/center_region_launch.h"

namespace solo_fast {
namespace center_region {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 4;

__device__ __forceinline__ int image_of(const AssignParams& p, int64_t g) {
  const int64_t* first = p.table + 3 * p.B;
  int b = 0;
  while (b + 1 < p.B && g >= first[b + 1]) ++b;
  return b;
}

__device__ __forceinline__ const uint8_t* instance_mask(const AssignParams& p, int b, int64_t m) {
  return reinterpret_cast<const uint8_t*>(p.table[b]) + m * p.H * p.W;
}

// Pixel (r, c) of value v into a thread's partial DeviceStats.
__device__ __forceinline__ void accumulate(DeviceStats& a, unsigned int v, int64_t r, int64_t c, int64_t H,
                                           int64_t W) {
  a.area += v;
  a.sum_r += static_cast<unsigned long long>(r) * v;
  a.sum_c += static_cast<unsigned long long>(c) * v;
  a.rmin_from_end = max(a.rmin_from_end, static_cast<unsigned int>(H - r));
  a.rmax_plus1 = max(a.rmax_plus1, static_cast<unsigned int>(r + 1));
  a.cmin_from_end = max(a.cmin_from_end, static_cast<unsigned int>(W - c));
  a.cmax_plus1 = max(a.cmax_plus1, static_cast<unsigned int>(c + 1));
}

__device__ __forceinline__ void merge(DeviceStats& a, const DeviceStats& b) {
  a.area += b.area;
  a.sum_r += b.sum_r;
  a.sum_c += b.sum_c;
  a.rmin_from_end = max(a.rmin_from_end, b.rmin_from_end);
  a.rmax_plus1 = max(a.rmax_plus1, b.rmax_plus1);
  a.cmin_from_end = max(a.cmin_from_end, b.cmin_from_end);
  a.cmax_plus1 = max(a.cmax_plus1, b.cmax_plus1);
}

__device__ __forceinline__ void warp_reduce(DeviceStats& a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a.area += __shfl_down_sync(0xffffffffu, a.area, off);
    a.sum_r += __shfl_down_sync(0xffffffffu, a.sum_r, off);
    a.sum_c += __shfl_down_sync(0xffffffffu, a.sum_c, off);
    a.rmin_from_end = max(a.rmin_from_end, __shfl_down_sync(0xffffffffu, a.rmin_from_end, off));
    a.rmax_plus1 = max(a.rmax_plus1, __shfl_down_sync(0xffffffffu, a.rmax_plus1, off));
    a.cmin_from_end = max(a.cmin_from_end, __shfl_down_sync(0xffffffffu, a.cmin_from_end, off));
    a.cmax_plus1 = max(a.cmax_plus1, __shfl_down_sync(0xffffffffu, a.cmax_plus1, off));
  }
}

// grid (ceil(H / kRowsPerBlock), total). Integer sums, so the atomics' order is free.
__global__ void __launch_bounds__(kThreads) moments_kernel(AssignParams p) {
  const int64_t g = blockIdx.y;
  const int b = image_of(p, g);
  const int64_t m = g - p.table[3 * p.B + b];
  const uint8_t* mask = instance_mask(p, b, m);
  const int64_t H = p.H, W = p.W;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t r1 = r0 + kRowsPerBlock < H ? r0 + kRowsPerBlock : H;
  DeviceStats a{};
  // Masks are mostly background: read four bytes at a time and skip zero words.
  const bool words = (W % 4 == 0) && (reinterpret_cast<uintptr_t>(mask) % 4 == 0);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = mask + r * W;
    if (words) {
      const uint32_t* row4 = reinterpret_cast<const uint32_t*>(row);
      for (int64_t k = threadIdx.x; k < W / 4; k += kThreads) {
        const uint32_t word = __ldg(row4 + k);
        if (word == 0) continue;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const unsigned int v = (word >> (8 * q)) & 0xffu;
          if (v) accumulate(a, v, r, 4 * k + q, H, W);
        }
      }
    } else {
      for (int64_t c = threadIdx.x; c < W; c += kThreads) {
        const unsigned int v = __ldg(row + c);
        if (v) accumulate(a, v, r, c, H, W);
      }
    }
  }
  warp_reduce(a);
  __shared__ DeviceStats warp_acc[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_acc[warp] = a;
  __syncthreads();
  if (threadIdx.x != 0) return;
  DeviceStats t = warp_acc[0];
  for (int w = 1; w < kWarps; ++w) merge(t, warp_acc[w]);
  if (t.area == 0) return;
  DeviceStats* s = p.stats + g;
  atomicAdd(&s->area, t.area);
  atomicAdd(&s->sum_r, t.sum_r);
  atomicAdd(&s->sum_c, t.sum_c);
  atomicMax(&s->rmin_from_end, t.rmin_from_end);
  atomicMax(&s->rmax_plus1, t.rmax_plus1);
  atomicMax(&s->cmin_from_end, t.cmin_from_end);
  atomicMax(&s->cmax_plus1, t.cmax_plus1);
}

// grid (ceil(max_out / kThreads), total, D): one output pixel of one mask target.
__global__ void __launch_bounds__(kThreads) downsample_kernel(AssignParams p) {
  const int k = blockIdx.z;
  const int64_t s = p.stride[k];
  const int64_t oh = p.H / s, ow = p.W / s;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= oh * ow) return;
  const int64_t g = blockIdx.y;
  const int b = image_of(p, g);
  const int64_t m = g - p.table[3 * p.B + b];
  const uint8_t* mask = instance_mask(p, b, m);
  const int64_t d = idx / ow, e = idx - d * ow;
  const Tap ty = linear_tap(linear_scale(p.H, oh), d, p.H, oh);
  const Tap tx = linear_tap(linear_scale(p.W, ow), e, p.W, ow);
  uint8_t* out = reinterpret_cast<uint8_t*>(p.table[4 * p.B + 1 + b * p.D + k]) + m * oh * ow;
  out[idx] = bilinear_pixel(mask + ty.i0 * p.W, mask + ty.i1 * p.W, ty, tx);
}

// One thread per (instance, level).
__global__ void __launch_bounds__(kThreads) region_kernel(AssignParams p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= p.total * p.L) return;
  const int64_t g = idx / p.L;
  const int l = static_cast<int>(idx - g * p.L);
  const int b = image_of(p, g);
  const int64_t m = g - p.table[3 * p.B + b];
  const DeviceStats st = p.stats[g];
  Moments mo;
  mo.area = static_cast<int64_t>(st.area);
  mo.sum_r = static_cast<int64_t>(st.sum_r);
  mo.sum_c = static_cast<int64_t>(st.sum_c);
  mo.rmin = p.H - static_cast<int64_t>(st.rmin_from_end);
  mo.rmax = static_cast<int64_t>(st.rmax_plus1) - 1;
  mo.cmin = p.W - static_cast<int64_t>(st.cmin_from_end);
  mo.cmax = static_cast<int64_t>(st.cmax_plus1) - 1;
  double w, h;
  const double* box = reinterpret_cast<const double*>(p.table[2 * p.B + b]);
  if (box != nullptr) {
    w = dsub(box[4 * m + 2], box[4 * m + 0]);
    h = dsub(box[4 * m + 3], box[4 * m + 1]);
  } else {
    tight_box_wh(mo, &w, &h);
  }
  if (!in_scale_range(mo.area, w, h, p.scale_lo[l], p.scale_hi[l])) return;
  const int64_t S = p.grid[l];
  const Region reg = center_region(mo, w, h, p.H, p.W, S, p.pos_scale);
  int32_t* own = p.owner + b * p.cell_offset[p.L] + p.cell_offset[l];
  for (int64_t i = reg.top; i <= reg.down; ++i)
    for (int64_t j = reg.left; j <= reg.right; ++j) atomicMax(own + i * S + j, static_cast<int32_t>(m));
}

// grid (ceil(cells per image / kThreads), B): one thread per cell.
__global__ void __launch_bounds__(kThreads) labels_kernel(AssignParams p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t cells = p.cell_offset[p.L];
  if (c >= cells) return;
  const int b = blockIdx.y;
  int l = 0;
  while (c >= p.cell_offset[l + 1]) ++l;
  const int32_t o = p.owner[b * cells + c];
  int64_t* lab = reinterpret_cast<int64_t*>(p.table[4 * p.B + 1 + p.B * p.D + b * p.L + l]);
  const int64_t* gt = reinterpret_cast<const int64_t*>(p.table[p.B + b]);
  lab[c - p.cell_offset[l]] = o >= 0 ? gt[o] : p.num_classes;
  if (o >= 0) atomicAdd(p.counts + b * p.L + l, 1);
}

// One block per (image, level): stream compaction of the owners in cell order.
__global__ void __launch_bounds__(kThreads) compact_kernel(AssignParams p, const int64_t* outputs) {
  const int seg = blockIdx.x;
  const int b = seg / p.L, l = seg - b * p.L;
  const int64_t S = p.grid[l];
  const int64_t n = S * S;
  const int32_t* own = p.owner + b * p.cell_offset[p.L] + p.cell_offset[l];
  int64_t* cells = reinterpret_cast<int64_t*>(outputs[seg]);
  int64_t* inst = reinterpret_cast<int64_t*>(outputs[p.B * p.L + seg]);
  __shared__ int warp_count[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t base = 0;
  for (int64_t start = 0; start < n; start += kThreads) {
    const int64_t c = start + threadIdx.x;
    const int32_t o = c < n ? own[c] : -1;
    const unsigned int ballot = __ballot_sync(0xffffffffu, o >= 0);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u)), chunk = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_count[w] : 0;
      chunk += warp_count[w];
    }
    if (o >= 0) {
      cells[base + before] = c;
      inst[base + before] = o;
    }
    base += chunk;
    __syncthreads();
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

cudaError_t center_region_assign_launch(const AssignParams& p, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (p.total > 0) err = cudaMemsetAsync(p.stats, 0, sizeof(DeviceStats) * p.total, stream);
  if (err == cudaSuccess)
    err = cudaMemsetAsync(p.owner, 0xff, sizeof(int32_t) * p.B * p.cell_offset[p.L], stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(p.counts, 0, sizeof(int32_t) * p.B * p.L, stream);
  if (err != cudaSuccess) return err;
  if (p.total > 0) {
    const dim3 rows(static_cast<unsigned int>(ceil_div(p.H, kRowsPerBlock)), static_cast<unsigned int>(p.total));
    moments_kernel<<<rows, kThreads, 0, stream>>>(p);
    const dim3 pixels(static_cast<unsigned int>(ceil_div(p.max_out, kThreads)), static_cast<unsigned int>(p.total),
                      static_cast<unsigned int>(p.D));
    downsample_kernel<<<pixels, kThreads, 0, stream>>>(p);
    region_kernel<<<static_cast<unsigned int>(ceil_div(p.total * p.L, kThreads)), kThreads, 0, stream>>>(p);
  }
  const dim3 cells(static_cast<unsigned int>(ceil_div(p.cell_offset[p.L], kThreads)), static_cast<unsigned int>(p.B));
  labels_kernel<<<cells, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t center_region_compact_launch(const AssignParams& p, const int64_t* outputs, cudaStream_t stream) {
  compact_kernel<<<static_cast<unsigned int>(p.B * p.L), kThreads, 0, stream>>>(p, outputs);
  return cudaGetLastError();
}

}  // namespace center_region
}  // namespace solo_fast
