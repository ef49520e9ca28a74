// The work of one mlifast::winograd_conv3x3 call on the CPU (csrc/cpu/winograd_conv.cpp):
// a Job, and its two steps (each point's weight transformed; blocks of tiles convolved) as
// templates on the vector width. Each width's copy is compiled in a file of its own
// (winograd_tasks_{avx512,avx2,baseline}.cpp), so that the three compile in parallel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "winograd_conv.h"

namespace mlifast {
namespace winograd_tasks {

constexpr int kM = 4;  // outputs per tile side: F(4×4, 3×3)

inline int64_t block_moment_doubles(int64_t Co) { return 1 + 2 * Co; }

// A call's work: K points, each its own weight (bias, input map) on its own images, one
// after the other in x and y; `g` and `tiles` are one point's.
struct Job {
  const float *x, *w_taps, *bias, *addend;
  winograd::InputAffine affine;
  float *U, *y;
  double* moments;  // each block's count, mean and m2 (1 + 2·C_out doubles a block), or nullptr
  winograd::Geometry g;
  int64_t tiles, blocks;  // a point's
  int64_t affine_step;    // floats from one point's input map to the next (0: one for all)

  int64_t x_floats() const { return g.batch * g.height * g.width * g.in_channels; }
  int64_t y_floats() const { return g.batch * g.out_height() * g.out_width() * g.out_channels; }
  int64_t w_floats() const { return 9 * g.in_channels * g.out_channels; }
  int64_t u_floats() const {
    constexpr int A = winograd::Transforms<kM>::kAlpha;
    return A * A * winograd::weight_plane_floats(g.in_channels, g.out_channels);
  }
};

// The calling worker's V and Mb (winograd::convolve_block), kept between calls
// (winograd_conv.cpp).
float* worker_scratch(int64_t floats);

// Rows [begin, end) of the K points' C_in rows of weight, point after point.
template <int Bytes>
MLIFAST_WINOGRAD_INLINE void transform_weight_task(const Job& j, int64_t begin, int64_t end) {
  const int64_t Ci = j.g.in_channels;
  for (int64_t k = begin / Ci; k * Ci < end; ++k) {
    winograd::transform_weight<kM, Bytes>(j.w_taps + k * j.w_floats(), j.g, std::max(begin - k * Ci, int64_t(0)),
                                          std::min(end - k * Ci, Ci), j.U + k * j.u_floats());
  }
}

template <int Bytes, winograd::Prologue P, bool kAdd, bool kRelu>
MLIFAST_WINOGRAD_INLINE void blocks(const Job& j, int64_t begin, int64_t end) {
  using namespace winograd;
  constexpr int A = Transforms<kM>::kAlpha;
  const int64_t v_floats = A * A * plane_floats(input_stride(j.g.in_channels));
  float* V = worker_scratch(v_floats + A * A * plane_floats(j.g.out_channels));
  // (block b's point, first tile, its tiles, and its images x, addend and y)
  const auto block = [&](int64_t b) MLIFAST_WINOGRAD_LAMBDA {
    const int64_t k = b / j.blocks, first = b % j.blocks * kTiles, y_at = k * j.y_floats();
    return std::make_tuple(k, first, std::min(kTiles, j.tiles - first), j.x + k * j.x_floats(),
                           j.addend == nullptr ? nullptr : j.addend + y_at, j.y + y_at);
  };
  for (int64_t b = begin; b < end; ++b) {
    const auto [k, first, tiles, x, addend, y] = block(b);
    Ahead ahead;
    if (b + 1 < end) {
      const auto [k_, first_, tiles_, x_, addend_, y_] = block(b + 1);
      ahead = block_ahead<kM>(x_, addend_, y_, j.g, first_, tiles_);
    }
    const InputAffine affine{j.affine.scale == nullptr ? nullptr : j.affine.scale + k * j.affine_step,
                             j.affine.shift == nullptr ? nullptr : j.affine.shift + k * j.affine_step};
    convolve_block<kM, Bytes, P, kAdd, kRelu>(
        x, affine, j.U + k * j.u_floats(), j.bias == nullptr ? nullptr : j.bias + k * j.g.out_channels, addend, j.g,
        first, tiles, V, V + v_floats, y, j.moments == nullptr ? nullptr : j.moments + b * block_moment_doubles(j.g.out_channels),
        ahead);
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
// for it); `vector_bytes()` picks one at run time. Each winograd_tasks_*.cpp defines one
// width's pair with MLIFAST_WINOGRAD_TASKS(bytes, its target attribute or nothing).
#define MLIFAST_WINOGRAD_TASKS(BYTES, ...)                                                                  \
  namespace mlifast {                                                                                         \
  namespace winograd_tasks {                                                                                  \
  __VA_ARGS__ void weight_##BYTES(const Job& j, int64_t begin, int64_t end) {                                \
    transform_weight_task<BYTES>(j, begin, end);                                                              \
  }                                                                                                           \
  __VA_ARGS__ void blocks_##BYTES(const Job& j, winograd::Prologue p, bool relu, int64_t begin, int64_t end) { \
    blocks_task<BYTES>(j, p, relu, begin, end);                                                               \
  }                                                                                                           \
  }                                                                                                           \
  }
void weight_64(const Job& j, int64_t begin, int64_t end);
void weight_32(const Job& j, int64_t begin, int64_t end);
void weight_16(const Job& j, int64_t begin, int64_t end);
void blocks_64(const Job& j, winograd::Prologue p, bool relu, int64_t begin, int64_t end);
void blocks_32(const Job& j, winograd::Prologue p, bool relu, int64_t begin, int64_t end);
void blocks_16(const Job& j, winograd::Prologue p, bool relu, int64_t begin, int64_t end);

}  // namespace winograd_tasks
}  // namespace mlifast
