// CPU kernel of mlifast::winograd_conv3x3 (schema in csrc/ops.cpp): a 3×3, stride-1
// convolution of channels-last float32 images by Winograd's F(4×4, 3×3), with a per-channel
// affine map and ReLU of its input in its first step, and the bias, a residual addend and a
// ReLU in its last (winograd_conv.h has the algorithm); optionally the per-channel moments
// of its output, read back from each block while it is in cache (a batch norm's statistics:
// on W2's three shapes 0.06, 0.04 and 0.02 ms a call, where channel_moments' own pass took
// 0.16, 0.075 and 0.035).
//
// On W2's ResNet-20 shapes (64 images, 2 threads) it took 0.64, 0.53 and 0.50 ms where
// oneDNN's direct convolution took 1.08, 1.00 and 0.92 ms (16 channels at 32 × 32, 32 at
// 16 × 16, 64 at 8 × 8; with the addition and ReLU, 1.9–2.1×:
// benchmarks/winograd_conv.py).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "kept_scratch.h"
#include "moments.h"
#include "vector_width.h"
#include "winograd_conv.h"
#include "winograd_tasks.h"

namespace mlifast {

// 64-byte aligned (ATen's allocator), so that no vector of them straddles two cache lines.
float* winograd_tasks::worker_scratch(int64_t floats) {
  static thread_local at::Tensor kept;
  return kept_scratch(kept, {floats}, at::kFloat, std::numeric_limits<int64_t>::max()).data_ptr<float>();
}

namespace {

using winograd_tasks::Job;
using winograd_tasks::block_moment_doubles;
using winograd_tasks::kM;

constexpr const char* kOp = "mlifast::winograd_conv3x3: ";
constexpr int64_t kChannelMultiple = 16;  // channels come in whole vectors of every width

std::optional<at::Tensor> channels_last_float(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? std::optional<at::Tensor>(t->contiguous(at::MemoryFormat::ChannelsLast))
                                       : std::nullopt;
}

// `points` followed by `rest`: a per-point operand's shape ((K, …) for a weight of K points).
std::vector<int64_t> shape_of(at::IntArrayRef points, std::initializer_list<int64_t> rest) {
  std::vector<int64_t> shape(points.begin(), points.end());
  shape.insert(shape.end(), rest);
  return shape;
}

// Float32 CPU `scale` and `shift` of the input's prologue of shape `shape`, contiguous (both or neither).
std::optional<std::pair<at::Tensor, at::Tensor>> input_affine(const std::optional<at::Tensor>& scale,
                                                              const std::optional<at::Tensor>& shift,
                                                              const std::vector<int64_t>& shape) {
  const bool has_scale = scale.has_value() && scale->defined(), has_shift = shift.has_value() && shift->defined();
  TORCH_CHECK(has_scale == has_shift, kOp, "input_scale and input_shift come together, got only ",
              has_scale ? "input_scale" : "input_shift");
  if (!has_scale) return std::nullopt;
  for (const at::Tensor* t : {&*scale, &*shift}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape) && t->scalar_type() == at::kFloat && t->device().is_cpu(), kOp,
                "expected float32 CPU input_scale and input_shift of shape ", at::IntArrayRef(shape), ", got ",
                t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
  return std::make_pair(scale->contiguous(), shift->contiguous());
}

// Each point's blocks' moments merged in block order (the result does not depend on the
// number of threads) into `moments` (K, 2, C_out) float64: mean and biased variance.
void merge_block_moments(const std::vector<double>& blocks_moments, int64_t points, int64_t blocks, int64_t Co,
                         const at::Tensor& moments) {
  auto into = moments.accessor<double, 3>();
  for (int64_t k = 0; k < points; ++k) {
    std::vector<double> n(Co, 0.0), mean(Co, 0.0), m2(Co, 0.0);
    for (int64_t b = k * blocks; b < (k + 1) * blocks; ++b) {
      const double* block = blocks_moments.data() + b * block_moment_doubles(Co);
      for (int64_t c = 0; c < Co; ++c) merge_moments(n[c], mean[c], m2[c], block[0], block[1 + c], block[1 + Co + c]);
    }
    for (int64_t c = 0; c < Co; ++c) into[k][0][c] = mean[c], into[k][1][c] = m2[c] / n[c];
  }
}

at::Tensor& winograd_conv3x3_out_cpu(const at::Tensor& input_, const at::Tensor& weight_,
                                     const std::optional<at::Tensor>& bias_, at::IntArrayRef padding,
                                     const std::optional<at::Tensor>& addend_, bool relu,
                                     const std::optional<at::Tensor>& input_scale,
                                     const std::optional<at::Tensor>& input_shift, bool input_relu, at::Tensor& out,
                                     const std::optional<at::Tensor>& moments) {
  TORCH_CHECK(input_.dim() == 4 && input_.scalar_type() == at::kFloat && input_.device().is_cpu(), kOp,
              "expected a 4-d float32 CPU input (N, C_in, H, W), got ", input_.sizes(), " ", input_.scalar_type(),
              " on ", input_.device());
  const int64_t N = input_.size(0), Ci = input_.size(1), H = input_.size(2), W = input_.size(3);
  // A 5-d weight: K points, each its own (C_out, C_in, 3, 3) on N / K images.
  const int64_t wd = weight_.dim();
  TORCH_CHECK((wd == 4 || wd == 5) && weight_.size(wd - 3) == Ci && weight_.size(wd - 2) == 3 &&
                  weight_.size(wd - 1) == 3 && weight_.scalar_type() == at::kFloat && weight_.device().is_cpu(),
              kOp, "expected a float32 CPU weight (C_out, ", Ci, ", 3, 3), or (K, C_out, ", Ci,
              ", 3, 3) for K points, got ", weight_.sizes(), " ", weight_.scalar_type(), " on ", weight_.device());
  const at::IntArrayRef points = weight_.sizes().slice(0, wd - 4);
  const int64_t K = wd == 5 ? weight_.size(0) : 1, Co = weight_.size(wd - 4);
  TORCH_CHECK(K >= 1 && N % K == 0, kOp, "a weight of ", K, " points needs a multiple of ", K,
              " images, each point's in turn, got ", N);
  TORCH_CHECK(Ci % kChannelMultiple == 0 && Co % kChannelMultiple == 0, kOp, "input and output channels must be ",
              "multiples of ", kChannelMultiple, ", got ", Ci, " and ", Co, " (use torch.conv2d for these)");
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, kOp,
              "expected padding of two values >= 0, got ", padding);
  const winograd::Geometry g{N / K, H, W, Ci, Co, padding[0], padding[1]};
  TORCH_CHECK(g.out_height() >= 1 && g.out_width() >= 1, kOp, "a ", H, " x ", W, " input with padding ", padding,
              " is smaller than the 3 x 3 kernel");
  const at::Tensor input = input_.contiguous(at::MemoryFormat::ChannelsLast);
  std::optional<std::pair<at::Tensor, at::Tensor>> affine = input_affine(input_scale, input_shift, shape_of(points, {Ci}));
  const bool shared_affine = !affine.has_value();  // (a ReLU alone: one identity map for every point)
  if (input_relu && !affine) affine = std::make_pair(at::ones({Ci}, input.options()), at::zeros({Ci}, input.options()));
  const winograd::Prologue prologue = !affine       ? winograd::Prologue::kNone
                                      : input_relu ? winograd::Prologue::kAffineRelu
                                                   : winograd::Prologue::kAffine;
  // (…, C_in, 3, 3, C_out): vectors of C_out
  const at::Tensor weight = wd == 5 ? weight_.permute({0, 2, 3, 4, 1}).contiguous()
                                    : weight_.permute({1, 2, 3, 0}).contiguous();
  const std::optional<at::Tensor> bias =
      bias_.has_value() && bias_->defined() ? std::optional<at::Tensor>(bias_->contiguous()) : std::nullopt;
  if (bias) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef(shape_of(points, {Co})) && bias->scalar_type() == at::kFloat &&
                    bias->device().is_cpu(),
                kOp, "expected a float32 CPU bias ", at::IntArrayRef(shape_of(points, {Co})), ", got ", bias->sizes(),
                " ", bias->scalar_type());
  }
  const std::vector<int64_t> out_sizes{N, Co, g.out_height(), g.out_width()};
  const std::optional<at::Tensor> addend = channels_last_float(addend_);
  if (addend) {
    TORCH_CHECK(addend->sizes() == at::IntArrayRef(out_sizes) && addend->scalar_type() == at::kFloat &&
                    addend->device().is_cpu(),
                kOp, "expected a float32 CPU addend of the output's shape ", at::IntArrayRef(out_sizes), ", got ",
                addend->sizes(), " ", addend->scalar_type());
  }
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_sizes) && out.scalar_type() == at::kFloat && out.device().is_cpu() &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              kOp, "out must be a channels-last float32 CPU tensor of shape ", at::IntArrayRef(out_sizes), ", got ",
              out.sizes(), " ", out.scalar_type(), " with strides ", out.strides());
  // An addend may be out itself (each value is read before it is written), not part of it.
  at::assert_no_overlap(out, input);
  if (addend) at::assert_no_partial_overlap(out, *addend);
  if (bias) at::assert_no_overlap(out, *bias);
  if (affine) at::assert_no_overlap(out, affine->first), at::assert_no_overlap(out, affine->second);
  const bool gather = moments.has_value() && moments->defined();
  const std::vector<int64_t> moments_shape = shape_of(points, {2, Co});
  if (gather) {
    TORCH_CHECK(moments->sizes() == at::IntArrayRef(moments_shape) && moments->scalar_type() == at::kDouble &&
                    moments->device().is_cpu(),
                kOp, "moments must be a float64 CPU tensor of shape ", at::IntArrayRef(moments_shape), ", got ",
                moments->sizes(), " ", moments->scalar_type(), " on ", moments->device());
    // (written last, after every tile of out: in out's memory it would overwrite results)
    at::assert_no_overlap(*moments, out);
    at::assert_no_overlap(*moments, input);
  }
  if (out.numel() == 0) {
    if (gather) moments->fill_(std::nan(""));  // (the moments of no values)
    return out;
  }
  const int64_t tiles = g.batch * ((g.out_height() + kM - 1) / kM) * ((g.out_width() + kM - 1) / kM);
  const int64_t blocks = (tiles + winograd::kTiles - 1) / winograd::kTiles;
  std::vector<double> block_moments(gather ? K * blocks * block_moment_doubles(Co) : 0);
  Job job{input.const_data_ptr<float>(),
          weight.const_data_ptr<float>(),
          bias ? bias->const_data_ptr<float>() : nullptr,
          addend ? addend->const_data_ptr<float>() : nullptr,
          {affine ? affine->first.const_data_ptr<float>() : nullptr,
           affine ? affine->second.const_data_ptr<float>() : nullptr},
          nullptr,
          out.data_ptr<float>(),
          gather ? block_moments.data() : nullptr,
          g,
          tiles,
          blocks,
          shared_affine ? 0 : Ci};
  at::Tensor U = at::empty({K * job.u_floats()}, input.options());
  job.U = U.data_ptr<float>();
  const int bytes = vector_bytes();
  at::parallel_for(0, K * Ci, 8, [&](int64_t begin, int64_t end) {
    if (bytes == 64) winograd_tasks::weight_64(job, begin, end);
    else if (bytes == 32) winograd_tasks::weight_32(job, begin, end);
    else winograd_tasks::weight_16(job, begin, end);
  });
  at::parallel_for(0, K * blocks, 1, [&](int64_t begin, int64_t end) {
    if (bytes == 64) winograd_tasks::blocks_64(job, prologue, relu, begin, end);
    else if (bytes == 32) winograd_tasks::blocks_32(job, prologue, relu, begin, end);
    else winograd_tasks::blocks_16(job, prologue, relu, begin, end);
  });
  if (gather) merge_block_moments(block_moments, K, blocks, Co, wd == 5 ? *moments : moments->unsqueeze(0));
  return out;
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef padding,
                                const std::optional<at::Tensor>& addend, bool relu,
                                const std::optional<at::Tensor>& input_scale,
                                const std::optional<at::Tensor>& input_shift, bool input_relu) {
  TORCH_CHECK(input.dim() == 4 && (weight.dim() == 4 || weight.dim() == 5) && padding.size() == 2 &&
                  padding[0] >= 0 && padding[1] >= 0,
              kOp, "expected a 4-d input, a 4-d or 5-d weight and two paddings >= 0, got ", input.sizes(), ", ",
              weight.sizes(), " and ", padding);
  const int64_t height = input.size(2) + 2 * padding[0] - 2, width = input.size(3) + 2 * padding[1] - 2;
  TORCH_CHECK(height >= 1 && width >= 1, kOp, "a ", input.size(2), " x ", input.size(3), " input with padding ",
              padding, " is smaller than the 3 x 3 kernel");
  at::Tensor out = at::empty({input.size(0), weight.size(weight.dim() - 4), height, width},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  return winograd_conv3x3_out_cpu(input, weight, bias, padding, addend, relu, input_scale, input_shift, input_relu,
                                  out, std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlifast, CPU, m) {
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
  m.impl("winograd_conv3x3.out", &winograd_conv3x3_out_cpu);
}

// `.out` writes in place: the version counters of out and moments go up (autograd and
// PendingInputWritten see the write; torch's fallback would bump only what it returns).
// It has no derivatives: a tensor that requires grad is refused while grad mode is on.
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto& alias = arguments[i].alias_info();
    const c10::IValue& value = (*stack)[first + i];
    TORCH_CHECK(!(value.isTensor() && value.toTensor().requires_grad() && at::GradMode::is_enabled()), kOp,
                "has no derivatives, and ", arguments[i].name(), " requires grad: call it under torch.no_grad()");
    if (alias != nullptr && alias->isWrite() && value.isTensor()) written.push_back(value.toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

TORCH_LIBRARY_IMPL(mlifast, ADInplaceOrView, m) {
  m.impl("winograd_conv3x3.out", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}

}  // namespace mlifast
