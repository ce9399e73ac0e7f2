// The one place where the schemas of solo_fast's compiled ops are declared
// (torch.ops.solo_fast.*). CPU implementations register in csrc/cpu/, CUDA ones in
// csrc/cuda/, each with TORCH_LIBRARY_IMPL under these same names.
#include <Python.h>
#include <torch/library.h>

// A Python module named _C so `import solo_fast._C` loads this library and runs the
// static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "solo_fast compiled ops", -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(solo_fast, m) {
  // One image per entry of the lists; mask_strides are the distinct strides, and
  // mask_targets[b * len(mask_strides) + k] is image b downsampled by mask_strides[k].
  // labels / pos_cells / pos_instance are indexed b * len(num_grids) + level.
  m.def(
      "center_region_assign(Tensor[] gt_masks, Tensor[] gt_labels, Tensor?[] gt_boxes, int[] num_grids, "
      "float[] scale_lo, float[] scale_hi, float pos_scale, int num_classes, int[] mask_strides) -> "
      "(Tensor[] labels, Tensor[] pos_cells, Tensor[] pos_instance, Tensor[] mask_targets)");
  // Matrix NMS decay factors of masks already sorted by score (bit-packed popcount; the
  // Triton version is the Python-defined triton_op solo_fast::matrix_nms_decay).
  m.def("matrix_nms_decay_popcount(Tensor masks, Tensor labels, Tensor areas, str kernel, float sigma) -> Tensor");
  // Nonzero pixels per mask (int64 [N]): matrix_nms's default mask_area.
  m.def("matrix_nms_mask_area(Tensor masks) -> Tensor");
  // Tight xyxy boxes (float [N, 4]) of bool / uint8 masks [N, H, W], zeros for empty ones.
  m.def("masks_to_boxes(Tensor masks) -> Tensor");
  // soft [N, h, w] fp32 resized x4 (bilinear, half-pixel), cropped to [crop_h, crop_w],
  // resized to [out_h, out_w] where that differs, thresholded (> thr): bool [N, out_h, out_w]
  // (ops.binary_masks_x4).
  m.def("binary_masks_x4(Tensor soft, int crop_h, int crop_w, int out_h, int out_w, float thr) -> Tensor");
  // 3x3 / stride 1 / padding 1 convolution of a channels-last fp32 or bf16 input by
  // Winograd F(2x2, 3x3), solo_fast.ops.winograd_conv3x3: `packed` is winograd_pack(weight,
  // dtype), out_channels its weight's O; the output is channels-last in x's dtype.
  m.def("winograd_pack(Tensor weight, ScalarType dtype) -> Tensor");
  m.def("winograd_conv3x3(Tensor x, Tensor packed, Tensor? bias, int out_channels) -> Tensor");
  // The micro-kernel of dtype's GEMMs in winograd_conv3x3 and mask_logits on this CPU
  // ("brgemm", "avx2", or "none": they do not run), after setting float32's to `want`
  // ("auto" / "brgemm" / "avx2"; "" leaves it) -- tests run both kernels where both exist.
  m.def("cpu_gemm_kernel(ScalarType dtype, str want=\"\") -> str");
  // ops.mask_predict's GEMM for channels-last features: logits [K, n] fp32 = kernels [K, E]
  // @ features[n, E]^T + bias, fp32 or bf16 features (kernels cast to their dtype).
  m.def("mask_logits(Tensor features, Tensor kernels, Tensor? bias) -> Tensor");
  // Modulated deformable convolution (DCNv2), solo_fast.ops.deform_conv2d: columns sampled
  // `chunk` output pixels at a time. The backward returns (grad_x, grad_offset, grad_mask,
  // grad_weight); grad_bias is grad_out.sum((0, 2, 3)).
  m.def(
      "deform_conv2d_forward(Tensor x, Tensor offset, Tensor mask, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int offset_groups, int chunk) -> Tensor");
  m.def(
      "deform_conv2d_backward(Tensor grad_out, Tensor x, Tensor offset, Tensor mask, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int offset_groups, int chunk) -> "
      "(Tensor grad_x, Tensor grad_offset, Tensor grad_mask, Tensor grad_weight)");
}
