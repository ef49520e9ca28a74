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
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "moments.h"
#include "vector_width.h"
#include "winograd_conv.h"

namespace mlifast {
namespace {

constexpr const char* kOp = "mlifast::winograd_conv3x3: ";
constexpr int kM = 4;                    // outputs per tile side: F(4×4, 3×3)
constexpr int64_t kChannelMultiple = 16;  // channels come in whole vectors of every width

struct Job {
  const float *x, *w_taps, *bias, *addend;
  winograd::InputAffine affine;
  float *U, *y;
  double* moments;  // each block's count, mean and m2 (1 + 2·C_out doubles a block), or nullptr
  winograd::Geometry g;
  int64_t tiles;
};

int64_t block_moment_doubles(int64_t Co) { return 1 + 2 * Co; }

// The calling worker's V and Mb (winograd::convolve_block), kept between calls.
float* worker_scratch(int64_t floats) {
  static thread_local std::vector<float> kept;
  if (int64_t(kept.size()) < floats) kept.resize(floats);
  return kept.data();
}

template <int Bytes>
MLIFAST_WINOGRAD_INLINE void transform_weight_task(const Job& j, int64_t begin, int64_t end) {
  winograd::transform_weight<kM, Bytes>(j.w_taps, j.g, begin, end, j.U);
}

template <int Bytes, winograd::Prologue P, bool kAdd, bool kRelu>
MLIFAST_WINOGRAD_INLINE void blocks(const Job& j, int64_t begin, int64_t end) {
  using namespace winograd;
  constexpr int A = Transforms<kM>::kAlpha;
  const int64_t v_floats = A * A * plane_floats(input_stride(j.g.in_channels));
  float* V = worker_scratch(v_floats + A * A * plane_floats(j.g.out_channels));
  for (int64_t b = begin; b < end; ++b) {
    const int64_t first = b * kTiles;
    convolve_block<kM, Bytes, P, kAdd, kRelu>(
        j.x, j.affine, j.U, j.bias, j.addend, j.g, first, std::min(kTiles, j.tiles - first), V, V + v_floats, j.y,
        j.moments == nullptr ? nullptr : j.moments + b * block_moment_doubles(j.g.out_channels));
  }
}

template <int Bytes, winograd::Prologue P>
MLIFAST_WINOGRAD_INLINE void blocks_with(const Job& j, bool relu, int64_t begin, int64_t end) {
  if (j.addend != nullptr) {
    if (relu) blocks<Bytes, P, true, true>(j, begin, end);
    else blocks<Bytes, P, true, false>(j, begin, end);
  } else {
    if (relu) blocks<Bytes, P, false, true>(j, begin, end);
    else blocks<Bytes, P, false, false>(j, begin, end);
  }
}

template <int Bytes>
MLIFAST_WINOGRAD_INLINE void blocks_task(const Job& j, winograd::Prologue prologue, bool relu, int64_t begin,
                                         int64_t end) {
  using winograd::Prologue;
  if (prologue == Prologue::kAffineRelu) blocks_with<Bytes, Prologue::kAffineRelu>(j, relu, begin, end);
  else if (prologue == Prologue::kAffine) blocks_with<Bytes, Prologue::kAffine>(j, relu, begin, end);
  else blocks_with<Bytes, Prologue::kNone>(j, relu, begin, end);
}

// One copy of each step per instruction set (everything below them inlined, so compiled
// for it); `vector_bytes()` picks one at run time.
__attribute__((target("avx512f,avx2,fma"))) void weight_64(const Job& j, int64_t b, int64_t e) {
  transform_weight_task<64>(j, b, e);
}
__attribute__((target("avx2,fma"))) void weight_32(const Job& j, int64_t b, int64_t e) {
  transform_weight_task<32>(j, b, e);
}
void weight_16(const Job& j, int64_t b, int64_t e) { transform_weight_task<16>(j, b, e); }
__attribute__((target("avx512f,avx2,fma"))) void blocks_64(const Job& j, winograd::Prologue p, bool relu, int64_t b,
                                                            int64_t e) {
  blocks_task<64>(j, p, relu, b, e);
}
__attribute__((target("avx2,fma"))) void blocks_32(const Job& j, winograd::Prologue p, bool relu, int64_t b,
                                                   int64_t e) {
  blocks_task<32>(j, p, relu, b, e);
}
void blocks_16(const Job& j, winograd::Prologue p, bool relu, int64_t b, int64_t e) {
  blocks_task<16>(j, p, relu, b, e);
}

std::optional<at::Tensor> channels_last_float(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? std::optional<at::Tensor>(t->contiguous(at::MemoryFormat::ChannelsLast))
                                       : std::nullopt;
}

// (C_in,) float32 CPU `scale` and `shift` of the input's prologue, contiguous (both or neither).
std::optional<std::pair<at::Tensor, at::Tensor>> input_affine(const std::optional<at::Tensor>& scale,
                                                              const std::optional<at::Tensor>& shift, int64_t Ci) {
  const bool has_scale = scale.has_value() && scale->defined(), has_shift = shift.has_value() && shift->defined();
  TORCH_CHECK(has_scale == has_shift, kOp, "input_scale and input_shift come together, got only ",
              has_scale ? "input_scale" : "input_shift");
  if (!has_scale) return std::nullopt;
  for (const at::Tensor* t : {&*scale, &*shift}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == Ci && t->scalar_type() == at::kFloat && t->device().is_cpu(), kOp,
                "expected float32 CPU input_scale and input_shift of shape (", Ci, ",), got ", t->sizes(), " ",
                t->scalar_type(), " on ", t->device());
  }
  return std::make_pair(scale->contiguous(), shift->contiguous());
}

// The blocks' moments merged in block order (the result does not depend on the number of
// threads) into `moments` (2, C_out) float64: mean and biased variance.
void merge_block_moments(const std::vector<double>& blocks_moments, int64_t blocks, int64_t Co,
                         const at::Tensor& moments) {
  std::vector<double> n(Co, 0.0), mean(Co, 0.0), m2(Co, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    const double* block = blocks_moments.data() + b * block_moment_doubles(Co);
    for (int64_t c = 0; c < Co; ++c) merge_moments(n[c], mean[c], m2[c], block[0], block[1 + c], block[1 + Co + c]);
  }
  auto into = moments.accessor<double, 2>();
  for (int64_t c = 0; c < Co; ++c) into[0][c] = mean[c], into[1][c] = m2[c] / n[c];
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
  TORCH_CHECK(weight_.dim() == 4 && weight_.size(1) == Ci && weight_.size(2) == 3 && weight_.size(3) == 3 &&
                  weight_.scalar_type() == at::kFloat && weight_.device().is_cpu(),
              kOp, "expected a float32 CPU weight (C_out, ", Ci, ", 3, 3), got ", weight_.sizes(), " ",
              weight_.scalar_type(), " on ", weight_.device());
  const int64_t Co = weight_.size(0);
  TORCH_CHECK(Ci % kChannelMultiple == 0 && Co % kChannelMultiple == 0, kOp, "input and output channels must be ",
              "multiples of ", kChannelMultiple, ", got ", Ci, " and ", Co, " (use torch.conv2d for these)");
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, kOp,
              "expected padding of two values >= 0, got ", padding);
  const winograd::Geometry g{N, H, W, Ci, Co, padding[0], padding[1]};
  TORCH_CHECK(g.out_height() >= 1 && g.out_width() >= 1, kOp, "a ", H, " x ", W, " input with padding ", padding,
              " is smaller than the 3 x 3 kernel");
  const at::Tensor input = input_.contiguous(at::MemoryFormat::ChannelsLast);
  std::optional<std::pair<at::Tensor, at::Tensor>> affine = input_affine(input_scale, input_shift, Ci);
  if (input_relu && !affine) affine = std::make_pair(at::ones({Ci}, input.options()), at::zeros({Ci}, input.options()));
  const winograd::Prologue prologue = !affine       ? winograd::Prologue::kNone
                                      : input_relu ? winograd::Prologue::kAffineRelu
                                                   : winograd::Prologue::kAffine;
  const at::Tensor weight = weight_.permute({1, 2, 3, 0}).contiguous();  // (C_in, 3, 3, C_out): vectors of C_out
  const std::optional<at::Tensor> bias =
      bias_.has_value() && bias_->defined() ? std::optional<at::Tensor>(bias_->contiguous()) : std::nullopt;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Co && bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                kOp, "expected a float32 CPU bias (", Co, ",), got ", bias->sizes(), " ", bias->scalar_type());
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
  if (gather) {
    TORCH_CHECK(moments->dim() == 2 && moments->size(0) == 2 && moments->size(1) == Co &&
                    moments->scalar_type() == at::kDouble && moments->device().is_cpu(),
                kOp, "moments must be a float64 CPU tensor of shape (2, ", Co, "), got ", moments->sizes(), " ",
                moments->scalar_type(), " on ", moments->device());
  }
  if (out.numel() == 0) {
    if (gather) moments->fill_(std::nan(""));  // (the moments of no values)
    return out;
  }
  constexpr int A = winograd::Transforms<kM>::kAlpha;
  at::Tensor U = at::empty({A * A * winograd::weight_plane_floats(Ci, Co)}, input.options());
  const int64_t tiles = N * ((g.out_height() + kM - 1) / kM) * ((g.out_width() + kM - 1) / kM);
  const int64_t blocks = (tiles + winograd::kTiles - 1) / winograd::kTiles;
  std::vector<double> block_moments(gather ? blocks * block_moment_doubles(Co) : 0);
  const Job job{input.const_data_ptr<float>(),
                weight.const_data_ptr<float>(),
                bias ? bias->const_data_ptr<float>() : nullptr,
                addend ? addend->const_data_ptr<float>() : nullptr,
                {affine ? affine->first.const_data_ptr<float>() : nullptr,
                 affine ? affine->second.const_data_ptr<float>() : nullptr},
                U.data_ptr<float>(),
                out.data_ptr<float>(),
                gather ? block_moments.data() : nullptr,
                g,
                tiles};
  const int bytes = vector_bytes();
  at::parallel_for(0, Ci, 8, [&](int64_t begin, int64_t end) {
    if (bytes == 64) weight_64(job, begin, end);
    else if (bytes == 32) weight_32(job, begin, end);
    else weight_16(job, begin, end);
  });
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    if (bytes == 64) blocks_64(job, prologue, relu, begin, end);
    else if (bytes == 32) blocks_32(job, prologue, relu, begin, end);
    else blocks_16(job, prologue, relu, begin, end);
  });
  if (gather) merge_block_moments(block_moments, blocks, Co, *moments);
  return out;
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef padding,
                                const std::optional<at::Tensor>& addend, bool relu,
                                const std::optional<at::Tensor>& input_scale,
                                const std::optional<at::Tensor>& input_shift, bool input_relu) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4 && padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              kOp, "expected a 4-d input and weight and two paddings >= 0, got ", input.sizes(), ", ", weight.sizes(),
              " and ", padding);
  const int64_t height = input.size(2) + 2 * padding[0] - 2, width = input.size(3) + 2 * padding[1] - 2;
  TORCH_CHECK(height >= 1 && width >= 1, kOp, "a ", input.size(2), " x ", input.size(3), " input with padding ",
              padding, " is smaller than the 3 x 3 kernel");
  at::Tensor out = at::empty({input.size(0), weight.size(0), height, width},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  return winograd_conv3x3_out_cpu(input, weight, bias, padding, addend, relu, input_scale, input_shift, input_relu,
                                  out, std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlifast, CPU, m) {
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
  m.impl("winograd_conv3x3.out", &winograd_conv3x3_out_cpu);
}

// `.out` writes in place: the version counter of out goes up (autograd and
// PendingInputWritten see the write).
TORCH_LIBRARY_IMPL(mlifast, ADInplaceOrView, m) {
  m.impl("winograd_conv3x3.out", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}

}  // namespace mlifast
