// CUDA glue of mlifast::channel_moments and channel_affine (kernels in
// channel_passes_kernel.cu; schemas in csrc/ops.cpp). Built only against a CUDA torch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "channel_passes_checks.h"
#include "channel_passes_kernel.h"

namespace mlifast {
namespace {

constexpr const char* kMoments = "mlifast::channel_moments: ";
constexpr const char* kAffine = "mlifast::channel_affine: ";

cuda::DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? cuda::DType::Float64 : cuda::DType::Float32;  // (checked: one of the two)
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cuda(const at::Tensor& input_, int64_t points) {
  at::Tensor input = input_;
  const ChannelLayout L = channel_layout(input, points, kMoments);
  TORCH_CHECK(input.is_cuda(), kMoments, "expected a CUDA tensor, got one on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  MomentsOutputs o = moments_outputs(input, L);
  if (o.empty) return {o.mean, o.var};
  at::Tensor workspace = at::empty(
      {cuda::channel_moments_workspace(points, L.batch, L.channels, L.positions, L.rows)},
      input.options().dtype(at::kDouble));
  C10_CUDA_CHECK(cuda::launch_channel_moments(dtype_of(input), input.const_data_ptr(), L.rows, points, L.batch,
                                              L.channels, L.positions, workspace.data_ptr<double>(), o.mean.data_ptr(),
                                              o.var.data_ptr(), at::cuda::getCurrentCUDAStream().stream()));
  return {o.mean, o.var};
}

at::Tensor channel_affine_cuda(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                               const std::optional<at::Tensor>& addend, bool relu) {
  const AffineOperands o = affine_operands(input, scale, shift, addend, kAffine);
  TORCH_CHECK(input.is_cuda(), kAffine, "expected CUDA tensors, got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const ChannelLayout& L = o.layout;
  at::Tensor y = at::empty_like(o.input);
  C10_CUDA_CHECK(cuda::launch_channel_affine(dtype_of(input), o.input.const_data_ptr(),
                                             o.addend.defined() ? o.addend.const_data_ptr() : nullptr,
                                             o.scale.const_data_ptr(), o.shift.const_data_ptr(), L.rows, relu,
                                             L.points, L.batch, L.channels, L.positions, y.data_ptr(),
                                             at::cuda::getCurrentCUDAStream().stream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mlifast, CUDA, m) {
  m.impl("channel_moments", &channel_moments_cuda);
  m.impl("channel_affine", &channel_affine_cuda);
}

}  // namespace mlifast
