// CUDA registration of solo_fast::center_region_assign: allocates the outputs, hands raw
// pointers to the launchers in center_region_kernel.cu and reads back the positive
// counts once (the only synchronisation; the sizes of pos_cells depend on the data).
#include <ATen/ATen.h>
#include <ATen/core/List.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "center_region_inputs.h"
#include "common/center_region_launch.h"

namespace solo_fast {
namespace {

namespace cr = center_region;
using at::Tensor;

inline int64_t ptr_word(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<int64_t>(t.data_ptr()) : 0;
}

// A small host table of int64 words copied to the device without blocking the host;
// the caching host allocator keeps the pinned block alive until the copy is done.
Tensor to_device(const std::vector<int64_t>& words, const at::Device& device) {
  Tensor host = at::empty({static_cast<int64_t>(words.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(words.begin(), words.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

cr::Outputs center_region_assign_cuda(const cr::Inputs& in) {
  const int64_t B = in.B, L = in.L, D = in.D, H = in.H, W = in.W;
  const std::vector<int64_t>& first = in.first;
  TORCH_CHECK(L >= 1 && L <= cr::kMaxLevels, "center_region_assign: the CUDA kernel takes 1 to ", cr::kMaxLevels,
              " levels, got ", L);
  TORCH_CHECK(D <= cr::kMaxStrides, "center_region_assign: the CUDA kernel takes 1 to ", cr::kMaxStrides,
              " distinct mask strides, got ", D);
  const at::Device device = in.masks[0].device();
  const c10::cuda::CUDAGuard guard(device);

  cr::AssignParams p{};
  p.B = static_cast<int32_t>(B);
  p.L = static_cast<int32_t>(L);
  p.D = static_cast<int32_t>(D);
  p.H = H;
  p.W = W;
  p.num_classes = in.num_classes;
  p.pos_scale = in.pos_scale;
  p.cell_offset[0] = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(in.num_grids[l] > 0, "center_region_assign: grid sizes must be positive");
    p.grid[l] = static_cast<int32_t>(in.num_grids[l]);
    p.scale_lo[l] = in.scale_lo[l];
    p.scale_hi[l] = in.scale_hi[l];
    p.cell_offset[l + 1] = p.cell_offset[l] + in.num_grids[l] * in.num_grids[l];
  }
  p.max_out = 0;
  for (int64_t k = 0; k < D; ++k) {
    const int64_t stride = in.mask_strides[k];
    p.stride[k] = static_cast<int32_t>(stride);
    p.max_out = std::max(p.max_out, (H / stride) * (W / stride));
  }
  p.total = first[B];
  TORCH_CHECK(p.total <= 65535, "center_region_assign: at most 65535 instances per batch on CUDA, got ", p.total);

  const auto u8 = at::TensorOptions().dtype(at::kByte).device(device);
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(device);
  std::vector<Tensor> targets(B * D), labels_out(B * L);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < D; ++k)
      targets[b * D + k] = at::empty({first[b + 1] - first[b], H / in.mask_strides[k], W / in.mask_strides[k]}, u8);
    for (int64_t l = 0; l < L; ++l) labels_out[b * L + l] = at::empty({in.num_grids[l], in.num_grids[l]}, i64);
  }

  std::vector<int64_t> words;
  words.reserve(4 * B + 1 + B * D + B * L);
  for (const Tensor& t : in.masks) words.push_back(ptr_word(t));
  for (const Tensor& t : in.labels) words.push_back(ptr_word(t));
  for (const Tensor& t : in.boxes) words.push_back(ptr_word(t));
  for (int64_t b = 0; b <= B; ++b) words.push_back(first[b]);
  for (const Tensor& t : targets) words.push_back(ptr_word(t));
  for (const Tensor& t : labels_out) words.push_back(ptr_word(t));
  const Tensor table = to_device(words, device);

  const int64_t stats_words = (sizeof(cr::DeviceStats) * std::max<int64_t>(p.total, 1) + 7) / 8;
  const Tensor stats = at::empty({stats_words}, i64);
  const Tensor owner = at::empty({B * p.cell_offset[L]}, at::TensorOptions().dtype(at::kInt).device(device));
  const Tensor counts = at::empty({B * L}, at::TensorOptions().dtype(at::kInt).device(device));
  p.table = table.data_ptr<int64_t>();
  p.stats = reinterpret_cast<cr::DeviceStats*>(stats.data_ptr());
  p.owner = owner.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(cr::center_region_assign_launch(p, stream));

  const Tensor counts_host = counts.to(at::kCPU);  // the one synchronisation
  const int32_t* n = counts_host.data_ptr<int32_t>();
  std::vector<Tensor> cells_out(B * L), inst_out(B * L);
  std::vector<int64_t> out_words(2 * B * L);
  for (int64_t i = 0; i < B * L; ++i) {
    cells_out[i] = at::empty({n[i]}, i64);
    inst_out[i] = at::empty({n[i]}, i64);
    out_words[i] = ptr_word(cells_out[i]);
    out_words[B * L + i] = ptr_word(inst_out[i]);
  }
  const Tensor out_table = to_device(out_words, device);
  C10_CUDA_CHECK(cr::center_region_compact_launch(p, out_table.data_ptr<int64_t>(), stream));
  return {labels_out, cells_out, inst_out, targets};
}

}  // namespace

TORCH_LIBRARY_IMPL(solo_fast, CUDA, m) { m.impl("center_region_assign", &cr::checked<center_region_assign_cuda>); }

}  // namespace solo_fast
