// Argument checks and the input layout of mlifast::channel_moments and channel_affine,
// shared by every backend. The Python face (mlifast/ops/channels.py) raises friendlier
// errors first; these guard direct callers of torch.ops.mlifast.channel_*.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <vector>

namespace mlifast {

// K points of B entries each (dim 0), C channels, S positions per entry and channel, read
// either as rows of C contiguous values (channels-last images, (N, C)) or as contiguous
// runs of S values ((N, C, S)).
struct ChannelLayout {
  int64_t points, batch, channels, positions;
  bool rows;
};

// The layout of `input`, copied where it is neither of the two: into channels-last where
// its channels are innermost (a strided view of channels-last images), else contiguous
// (mlifast.ops.channels.in_kernel_layout says the same).
inline ChannelLayout channel_layout(at::Tensor& input, int64_t points, const char* op) {
  TORCH_CHECK(input.dim() >= 2, op, "expected input of shape (N, C, …), got ", input.sizes());
  TORCH_CHECK(points > 0 && input.size(0) % points == 0, op, "expected the ", input.size(0),
              " entries of dimension 0 to hold ", points, " points' rows each (a multiple of ", points, ")");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
              "expected float32 or float64 input, got ", input.scalar_type());
  const int64_t n = input.size(0), c = input.size(1);
  const int64_t s = n * c == 0 ? 0 : input.numel() / (n * c);
  const bool channels_last = (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                             (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (!input.is_contiguous() && !channels_last) {
    const bool innermost = (input.dim() == 4 || input.dim() == 5) && input.stride(1) == 1 && c > 1;
    input = !innermost          ? input.contiguous()
            : input.dim() == 4 ? input.contiguous(at::MemoryFormat::ChannelsLast)
                               : input.contiguous(at::MemoryFormat::ChannelsLast3d);
  }
  return ChannelLayout{points, n / points, c, s, s == 1 || !input.is_contiguous()};
}

// mean and var, (K, C) in the input's dtype, for a backend to fill; where no value is
// there to take (B·S = 0) filled with NaN, as torch's mean of nothing, and `empty` set.
struct MomentsOutputs {
  at::Tensor mean, var;
  bool empty;
};

inline MomentsOutputs moments_outputs(const at::Tensor& input, const ChannelLayout& L) {
  MomentsOutputs o{at::empty({L.points, L.channels}, input.options()),
                   at::empty({L.points, L.channels}, input.options()), L.batch * L.positions == 0};
  if (o.empty) {
    o.mean.fill_(std::numeric_limits<double>::quiet_NaN());
    o.var.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return o;
}

struct AffineOperands {
  ChannelLayout layout;
  at::Tensor input, scale, shift, addend;  // addend undefined where none; else in input's strides
};

inline AffineOperands affine_operands(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                                      const std::optional<at::Tensor>& addend, const char* op) {
  AffineOperands o{{}, input, {}, {}, {}};
  TORCH_CHECK(scale.dim() == 2 && input.dim() >= 2 && scale.size(1) == input.size(1), op,
              "expected scale of shape (K, C) for input of shape ", input.sizes(), ", got ", scale.sizes());
  o.layout = channel_layout(o.input, scale.size(0), op);
  TORCH_CHECK(shift.sizes() == scale.sizes(), op, "expected shift of scale's shape ", scale.sizes(), ", got ",
              shift.sizes());
  TORCH_CHECK(scale.scalar_type() == input.scalar_type() && shift.scalar_type() == input.scalar_type(), op,
              "expected scale and shift of the input's dtype ", input.scalar_type(), ", got ", scale.scalar_type(),
              " and ", shift.scalar_type());
  TORCH_CHECK(scale.device() == input.device() && shift.device() == input.device(), op,
              "expected scale and shift on the input's device ", input.device());
  o.scale = scale.contiguous();
  o.shift = shift.contiguous();
  if (addend.has_value()) {
    TORCH_CHECK(addend->sizes() == input.sizes() && addend->scalar_type() == input.scalar_type() &&
                    addend->device() == input.device(),
                op, "expected an addend of the input's shape, dtype and device, got ", addend->sizes(), " ",
                addend->scalar_type(), " on ", addend->device());
    o.addend = addend->strides() == o.input.strides() ? *addend : at::empty_like(o.input).copy_(*addend);
  }
  return o;
}

// channel_combine's operands: the n ≤ kMaxCombined inputs in one layout (B entries: one
// point's), scales (K, n, C) and shift (K, C) contiguous.
constexpr int64_t kMaxCombined = 8;

struct CombineOperands {
  ChannelLayout layout;  // points: K
  std::vector<at::Tensor> inputs;
  at::Tensor scales, shift;
};

inline CombineOperands combine_operands(at::TensorList inputs, const at::Tensor& scales, const at::Tensor& shift,
                                        const char* op) {
  TORCH_CHECK(!inputs.empty() && int64_t(inputs.size()) <= kMaxCombined, op, "expected 1 to ", kMaxCombined,
              " inputs, got ", inputs.size());
  CombineOperands o{{}, {inputs[0]}, {}, {}};
  o.layout = channel_layout(o.inputs[0], 1, op);
  const at::Tensor first = o.inputs[0];  // (a copy: pushing into o.inputs moves its elements)
  for (size_t i = 1; i < inputs.size(); ++i) {
    const at::Tensor& t = inputs[i];
    TORCH_CHECK(t.sizes() == first.sizes() && t.scalar_type() == first.scalar_type() && t.device() == first.device(),
                op, "expected inputs of one shape, dtype and device, got ", first.sizes(), " ", first.scalar_type(),
                " and ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
    o.inputs.push_back(t.strides() == first.strides() ? t : at::empty_like(first).copy_(t));
  }
  const int64_t n = int64_t(inputs.size()), C = first.size(1);
  TORCH_CHECK(scales.dim() == 3 && scales.size(1) == n && scales.size(2) == C, op, "expected scales of shape (K, ",
              n, ", ", C, "), got ", scales.sizes());
  TORCH_CHECK(shift.dim() == 2 && shift.size(0) == scales.size(0) && shift.size(1) == C, op,
              "expected shift of shape (", scales.size(0), ", ", C, "), got ", shift.sizes());
  TORCH_CHECK(scales.scalar_type() == first.scalar_type() && shift.scalar_type() == first.scalar_type() &&
                  scales.device() == first.device() && shift.device() == first.device(),
              op, "expected scales and shift of the inputs' dtype ", first.scalar_type(), " on ", first.device());
  o.layout.points = scales.size(0);
  o.scales = scales.contiguous();
  o.shift = shift.contiguous();
  return o;
}

// (K·B, C, …) in the inputs' layout.
inline at::Tensor combine_output(const CombineOperands& o) {
  const at::Tensor& first = o.inputs[0];
  std::vector<int64_t> sizes = first.sizes().vec();
  sizes[0] *= o.layout.points;
  const auto format = first.is_contiguous() ? at::MemoryFormat::Contiguous
                      : first.dim() == 4      ? at::MemoryFormat::ChannelsLast
                                              : at::MemoryFormat::ChannelsLast3d;
  return at::empty(sizes, first.options().memory_format(format));
}

}  // namespace mlifast
