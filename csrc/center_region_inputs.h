// Argument checks of solo_fast::center_region_assign, shared by its CPU registration
// (csrc/cpu/center_region_kernel.cpp) and its CUDA one (csrc/cuda/center_region_cuda.cpp).
// solo_fast.ops validates user input first, with ValueErrors naming the argument; these
// checks keep a direct torch.ops call from reading out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <optional>
#include <tuple>
#include <vector>

namespace solo_fast {
namespace center_region {

// The op's arguments, checked; the tensors on the device of gt_masks[0].
struct Inputs {
  int64_t B, L, D;                 // images, levels, distinct mask strides
  int64_t H, W;                    // padded image size
  std::vector<at::Tensor> masks;   // [B] uint8/bool [M_b, H, W], contiguous
  std::vector<at::Tensor> labels;  // [B] int64 [M_b], contiguous
  std::vector<at::Tensor> boxes;   // [B] float64 [M_b, 4], contiguous; undefined: the tight boxes
  std::vector<int64_t> first;      // [B + 1] batch index of each image's first instance
  at::IntArrayRef num_grids;       // [L] S of each level
  at::ArrayRef<double> scale_lo, scale_hi;  // [L] scale range of each level
  double pos_scale;
  int64_t num_classes;
  at::IntArrayRef mask_strides;  // [D], each dividing H and W
};

using Outputs = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                           std::vector<at::Tensor>>;  // labels, pos_cells, pos_instance, mask_targets

inline Inputs check_inputs(at::TensorList gt_masks, at::TensorList gt_labels,
                           const c10::List<std::optional<at::Tensor>>& gt_boxes, at::IntArrayRef num_grids,
                           at::ArrayRef<double> scale_lo, at::ArrayRef<double> scale_hi, double pos_scale,
                           int64_t num_classes, at::IntArrayRef mask_strides) {
  Inputs in;
  in.num_grids = num_grids;
  in.scale_lo = scale_lo;
  in.scale_hi = scale_hi;
  in.pos_scale = pos_scale;
  in.num_classes = num_classes;
  in.mask_strides = mask_strides;
  in.B = static_cast<int64_t>(gt_masks.size());
  in.L = static_cast<int64_t>(num_grids.size());
  in.D = static_cast<int64_t>(mask_strides.size());
  const int64_t B = in.B;
  TORCH_CHECK(B >= 1, "center_region_assign: expected at least one image");
  TORCH_CHECK(static_cast<int64_t>(gt_labels.size()) == B && static_cast<int64_t>(gt_boxes.size()) == B,
              "center_region_assign: gt_masks, gt_labels and gt_boxes need one entry per image");
  TORCH_CHECK(static_cast<int64_t>(scale_lo.size()) == in.L && static_cast<int64_t>(scale_hi.size()) == in.L,
              "center_region_assign: one scale range per level expected");
  TORCH_CHECK(in.D >= 1, "center_region_assign: expected at least one mask stride");
  TORCH_CHECK(gt_masks[0].dim() == 3, "center_region_assign: gt_masks must be [M, H, W]");
  const at::Device device = gt_masks[0].device();
  in.H = gt_masks[0].size(1);
  in.W = gt_masks[0].size(2);
  for (const int64_t s : mask_strides)
    TORCH_CHECK(s > 0 && in.H % s == 0 && in.W % s == 0, "center_region_assign: mask stride ", s,
                " must divide the padded size");

  in.masks.resize(B);
  in.labels.resize(B);
  in.boxes.resize(B);
  in.first.assign(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& m = gt_masks[b];
    TORCH_CHECK(m.device() == device && m.dim() == 3 && m.size(1) == in.H && m.size(2) == in.W,
                "center_region_assign: gt_masks[", b, "] must be a [M, H, W] tensor of the padded size on ", device);
    TORCH_CHECK(m.scalar_type() == at::kByte || m.scalar_type() == at::kBool,
                "center_region_assign: gt_masks must be uint8 or bool");
    in.masks[b] = m.contiguous();
    const int64_t M = m.size(0);
    in.labels[b] = gt_labels[b].to(device, at::kLong).contiguous();
    TORCH_CHECK(in.labels[b].dim() == 1 && in.labels[b].size(0) == M, "center_region_assign: gt_labels[", b,
                "] must have one entry per mask");
    const std::optional<at::Tensor> box = gt_boxes.get(b);
    if (box.has_value()) {
      in.boxes[b] = box->to(device, at::kDouble).contiguous();
      TORCH_CHECK(in.boxes[b].dim() == 2 && in.boxes[b].size(0) == M && in.boxes[b].size(1) == 4,
                  "center_region_assign: gt_boxes[", b, "] must be [M, 4]");
    }
    in.first[b + 1] = in.first[b] + M;
  }
  return in;
}

// The op with the schema's signature (csrc/solo_fast.cpp), for TORCH_LIBRARY_IMPL:
// checks the arguments once for every device's Impl.
template <Outputs (*Impl)(const Inputs&)>
Outputs checked(at::TensorList gt_masks, at::TensorList gt_labels, const c10::List<std::optional<at::Tensor>>& gt_boxes,
                at::IntArrayRef num_grids, at::ArrayRef<double> scale_lo, at::ArrayRef<double> scale_hi,
                double pos_scale, int64_t num_classes, at::IntArrayRef mask_strides) {
  return Impl(check_inputs(gt_masks, gt_labels, gt_boxes, num_grids, scale_lo, scale_hi, pos_scale, num_classes,
                           mask_strides));
}

}  // namespace center_region
}  // namespace solo_fast
