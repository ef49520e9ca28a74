// Schemas of every mlifast operator, defined once. Kernels register per dispatch key in
// csrc/cpu/ and csrc/cuda/; fake (meta) kernels and autograd are registered from Python
// (mlifast/ops/).
#include <torch/library.h>

TORCH_LIBRARY(mlifast, m) {
  // y[k] = input_k · (weight + Σ_j coeffs[k, j] · weight_dirs[j])ᵀ + (bias + Σ_j coeffs[k, j] · bias_dirs[j])
  // input: (K, R, I) per point, or (R, I) shared by every point; weight: (O, I);
  // bias: (O,); weight_dirs: (J, O, I); bias_dirs: (J, O); coeffs: (K, J) -> (K, R, O).
  // relu: max(y, 0) instead (the activation after the layer, applied in the same pass).
  m.def(
      "multipoint_linear(Tensor input, Tensor weight, Tensor? bias, Tensor weight_dirs, "
      "Tensor? bias_dirs, Tensor coeffs, bool relu=False) -> Tensor");
  // multipoint_linear by one of the GEMM forms a GPU dispatches between
  // (csrc/multipoint_linear_gemm_forms.h): points_per_gemm 0, the stacked form; n > 0, each
  // point's weight formed, n points to a batched GEMM. Private: for the tests and cuda_check.
  m.def(
      "_multipoint_linear_gemm_form(Tensor input, Tensor weight, Tensor? bias, Tensor weight_dirs, "
      "Tensor? bias_dirs, Tensor coeffs, int points_per_gemm) -> Tensor");
  // y[k] = base + (bias + Σ_j coeffs[k, j] · bias_dirs[j]) + Σ_j coeffs[k, j] · along[:, j]
  // base: (R, O) = x·weightᵀ; along: (R, J, O) = x·weight_dirs[j]ᵀ; bias: (O,);
  // bias_dirs: (J, O); coeffs: (K, J) -> (K, R, O). multipoint_linear of a shared input x
  // is multipoint_combine(x·weightᵀ, x·weight_dirsᵀ, ...). relu: as for multipoint_linear.
  m.def(
      "multipoint_combine(Tensor base, Tensor along, Tensor? bias, Tensor? bias_dirs, "
      "Tensor coeffs, bool relu=False) -> Tensor");
  // y[k] = relu(base + coeffs[k]·along) · (weight + coeffs[k]·weight_dir)ᵀ + (bias + coeffs[k]·bias_dir)
  // base, along: (R, I); weight, weight_dir: (O, I); bias, bias_dir: (O,); coeffs: (K,)
  // -> (K, R, O): the linear layer after a ReLU whose input is affine along a line (the
  // second layer of an MLP whose input is the same at every point). relu: as above;
  // negative_slope: a LeakyReLU's in place of the first relu (0: a ReLU).
  m.def(
      "relu_line_linear(Tensor base, Tensor along, Tensor weight, Tensor weight_dir, Tensor? bias, "
      "Tensor? bias_dir, Tensor coeffs, bool relu=False, float negative_slope=0.) -> Tensor");
  // The same into a contiguous (K, R, O) `out` (a caller reusing its output's memory).
  m.def(
      "relu_line_linear.out(Tensor base, Tensor along, Tensor weight, Tensor weight_dir, Tensor? bias, "
      "Tensor? bias_dir, Tensor coeffs, bool relu=False, float negative_slope=0., *, Tensor(a!) out) -> Tensor(a!)");
  // Each point's per-channel mean and biased variance, accumulated in float64: input
  // (K·B, C, …) holds K points' B entries each, point-major -> mean (K, C), var (K, C).
  m.def("channel_moments(Tensor input, int points) -> (Tensor, Tensor)");
  // y = input·scale[k, c] + shift[k, c] (+ addend), then ReLU if relu, on point k's entries
  // of input (K·B, C, …); scale, shift: (K, C); addend: input's shape -> y in input's layout.
  m.def("channel_affine(Tensor input, Tensor scale, Tensor shift, Tensor? addend, bool relu=False) -> Tensor");
  // y[k] = Σ_i inputs[i]·scales[k, i, c] + shift[k, c], then ReLU if relu: each point's
  // per-channel combination of n tensors (B, C, …) that every point shares (a first
  // convolution's products at the origin and along each direction, with a batch norm
  // folded in); scales (K, n, C), shift (K, C) -> y (K·B, C, …) in the inputs' layout.
  m.def("channel_combine(Tensor[] inputs, Tensor scales, Tensor shift, bool relu=False) -> Tensor");
  // y = conv2d(x, weight, bias, stride 1, padding) (+ addend), then ReLU if relu, by
  // Winograd's F(4×4, 3×3), where x = input·input_scale[c] + input_shift[c] (both (C_in,) or
  // None), then ReLU if input_relu (the zero padding is x's): input (N, C_in, H, W) float32,
  // weight (C_out, C_in, 3, 3), channels multiples of 16; addend: the output's shape ->
  // y (N, C_out, H', W') channels-last. A weight (K, C_out, C_in, 3, 3) is K points', each
  // on its N/K images in turn, with bias (K, C_out) and input_scale, input_shift (K, C_in).
  m.def(
      "winograd_conv3x3(Tensor input, Tensor weight, Tensor? bias, int[2] padding, Tensor? addend, "
      "bool relu=False, Tensor? input_scale=None, Tensor? input_shift=None, bool input_relu=False) -> Tensor");
  // The same into a channels-last `out` of the output's shape; `moments`, if given, (2, C_out)
  // float64 ((K, 2, C_out) for K points), receives each point's per-channel mean and biased
  // variance of what it wrote (a batch norm's statistics, read back from each block of
  // tiles while it is in cache).
  m.def(
      "winograd_conv3x3.out(Tensor input, Tensor weight, Tensor? bias, int[2] padding, Tensor? addend, "
      "bool relu=False, Tensor? input_scale=None, Tensor? input_shift=None, bool input_relu=False, *, "
      "Tensor(a!) out, Tensor(b!)? moments=None) -> Tensor(a!)");
}
