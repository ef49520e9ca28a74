// Winograd convolution F(m×m, 3×3) of channels-last float32 images, stride 1: the body of
// mlifast::winograd_conv3x3's CPU kernel (csrc/cpu/winograd_conv.cpp), apart from ATen.
//
// Each m×m output tile comes from an α×α input tile (α = m + 2): the tile goes through
// Bᵀ·d·B, each of the α² positions ξ takes a GEMM over input channels against the weight's
// G·w·Gᵀ, and Aᵀ·M·A gives the outputs. For m = 4, 36 multiply-adds per 16 outputs, input
// channel and output channel, against 144 direct. A block of kTiles tiles goes through all
// three steps in a thread's scratch memory (its L2 cache).
//
// Only m = 4 is defined: m = 2 (16 against 36) was slower than oneDNN's direct convolution
// on every shape of W2's ResNet-20 (16–64 channels), its transforms costing as much per
// tile as m = 4's for a quarter of the outputs; it was 20× more accurate (float32, against
// float64: 1e-6 against 2.5e-5 of outputs near 5).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "vector_width.h"

#ifndef MLIFAST_WINOGRAD_INLINE
#define MLIFAST_WINOGRAD_INLINE MLIFAST_ALWAYS_INLINE
#endif
// A lambda inlined into its caller (and so compiled for the caller's instruction set).
#define MLIFAST_WINOGRAD_LAMBDA __attribute__((always_inline))

namespace mlifast {
namespace winograd {

struct Geometry {
  int64_t batch, height, width, in_channels, out_channels, pad_h, pad_w;
  int64_t out_height() const { return height + 2 * pad_h - 2; }
  int64_t out_width() const { return width + 2 * pad_w - 2; }
};

// One dimension of each transform, on vectors of `Bytes` bytes: input r = Bᵀ·d, output
// y = Aᵀ·m (applied to columns, then rows), and the weight's G. Lavin and Gray
// (2016), "Fast Algorithms for Convolutional Neural Networks"; the sums are grouped to
// share terms.
template <int M>
struct Transforms;

template <>
struct Transforms<4> {
  static constexpr int kAlpha = 6;
  static constexpr float G[6][3] = {{1.0 / 4, 0, 0},
                                     {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                     {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                     {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                     {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                     {0, 0, 1}};

  // Bᵀ rows: (4 0 −5 0 1 0) (0 −4 −4 1 1 0) (0 4 −4 −1 1 0) (0 −2 −1 2 1 0) (0 2 −1 −2 1 0) (0 4 0 −5 0 1)
  template <typename V>
  MLIFAST_WINOGRAD_INLINE static void input(const V* d, V* r) {
    const V a = d[4] - d[2] * 4.0f, b = d[3] - d[1] * 4.0f, c = d[4] - d[2], e = (d[3] - d[1]) * 2.0f;
    r[0] = d[0] * 4.0f - d[2] * 5.0f + d[4];
    r[1] = a + b, r[2] = a - b, r[3] = c + e, r[4] = c - e;
    r[5] = d[1] * 4.0f - d[3] * 5.0f + d[5];
  }

  // Aᵀ rows: (1 1 1 1 1 0) (0 1 −1 2 −2 0) (0 1 1 4 4 0) (0 1 −1 8 −8 1)
  template <typename V>
  MLIFAST_WINOGRAD_INLINE static void output(const V* m, V* y) {
    const V sum12 = m[1] + m[2], diff12 = m[1] - m[2], sum34 = m[3] + m[4], diff34 = m[3] - m[4];
    y[0] = m[0] + sum12 + sum34;
    y[1] = diff12 + diff34 * 2.0f;
    y[2] = sum12 + sum34 * 4.0f;
    y[3] = diff12 + diff34 * 8.0f + m[5];
  }
};

constexpr int64_t kTiles = 48;  // tiles a block takes through the three steps (a multiple of every kRowTiles)

// Floats of scratch from one position ξ to the next, for `row` floats a tile: one cache
// line more than the tiles take, so that a tile's α² values do not all fall in one set of
// the L1 cache (at 64 input channels the planes lay 3 × 4096 bytes apart).
MLIFAST_WINOGRAD_INLINE int64_t plane_floats(int64_t row) { return kTiles * row + 16; }

#define MLIFAST_WINOGRAD_VECTOR typedef typename Vector<Bytes>::type Vec

// As many doubles as Vector<Bytes> has floats.
template <int Bytes>
struct Wide {
  typedef double type __attribute__((vector_size(2 * Bytes)));
};

// `step` to the compiler's eye changed on every pass of a channel loop: offsets made from
// it are computed where used, not the α² of them hoisted out of the loop, where they took
// more registers than there are and spilled (the input transform of a tile and vector:
// 814 instructions, 444 with this; 0.22 → 0.16 ms of a 16-channel call on one core).
MLIFAST_WINOGRAD_INLINE void recompute_offsets_from(int64_t& step) { asm volatile("" : "+r"(step)); }

// Floats from one position ξ of the transformed weight U to the next: one cache line more
// than its C_in × C_out, so that the α² planes do not lie a multiple of 4096 bytes apart
// (at 64 channels all 36 stores of a weight's row fell in one set of the L1 cache).
MLIFAST_WINOGRAD_INLINE int64_t weight_plane_floats(int64_t C_in, int64_t C_out) { return C_in * C_out + 16; }

// Floats ahead of each store of U fetched for writing (as kStoreAhead for V).
constexpr int64_t kWeightStoreAhead = 32;

// U[ξ][ci][co] = (G·w[co][ci]·Gᵀ)[ξ] for the weight laid out (C_in, 3, 3, C_out) contiguous
// (`w_taps`: each tap's output channels in a row), input channels [ci_begin, ci_end); a
// row i of positions and a vector of output channels at a time, its α stores a plane apart
// (on one core, 64 channels: 60 µs a call before the padded planes, this order and the
// fetches ahead; 18 µs with them).
template <int M, int Bytes>
MLIFAST_WINOGRAD_INLINE void transform_weight(const float* w_taps, const Geometry& g, int64_t ci_begin,
                                              int64_t ci_end, float* U) {
  MLIFAST_WINOGRAD_VECTOR;
  using T = Transforms<M>;
  constexpr int A = T::kAlpha;
  constexpr int64_t kWidth = Bytes / sizeof(float);
  const int64_t Co = g.out_channels;
  int64_t plane = weight_plane_floats(g.in_channels, Co);
  for (int64_t ci = ci_begin; ci < ci_end; ++ci) {
    for (int i = 0; i < A; ++i) {
      for (int64_t co = 0; co < Co; co += kWidth) {
        recompute_offsets_from(plane);
        Vec gk[3];  // row i of G·w
        for (int b = 0; b < 3; ++b) {
          const float* k = w_taps + (ci * 9 + b) * Co + co;
          gk[b] = load<Bytes>(k) * T::G[i][0] + load<Bytes>(k + 3 * Co) * T::G[i][1] +
                  load<Bytes>(k + 6 * Co) * T::G[i][2];
        }
        float* u = U + i * A * plane + ci * Co + co;
        for (int j = 0; j < A; ++j, u += plane) {
          store<Bytes>(u, gk[0] * T::G[j][0] + gk[1] * T::G[j][1] + gk[2] * T::G[j][2]);
          __builtin_prefetch(u + kWeightStoreAhead, 1, 3);
        }
      }
    }
  }
}

// Where the tiles of a block lie, tile after tile: image, and top-left output position
// (tiles run along rows of tiles, image after image).
struct TileWalk {
  int64_t image, row, col;
  const int64_t tiles_w, m;

  MLIFAST_WINOGRAD_INLINE TileWalk(int64_t tile, int64_t tiles_h, int64_t tiles_w_, int64_t m_) : tiles_w(tiles_w_), m(m_) {
    const int64_t per_image = tiles_h * tiles_w, in_image = tile % per_image;
    image = tile / per_image, row = in_image / tiles_w * m, col = in_image % tiles_w * m;
  }

  MLIFAST_WINOGRAD_INLINE void next(int64_t tiles_h) {
    col += m;
    if (col < tiles_w * m) return;
    col = 0, row += m;
    if (row < tiles_h * m) return;
    row = 0, ++image;
  }
};

// Floats ahead of each store of V that are fetched for writing: a tile's α² stores go to α²
// planes, lines not yet in the L1 cache, and each waited for its line in turn (W2's 16
// channels: 0.39 of 0.84 ms a call on one core went to the input transform, 0.22 with this;
// a tile ahead, or whole tiles staged in L1 and copied out a plane at a time, were slower).
constexpr int64_t kStoreAhead = 32;

// What happens to each input value inside the image before the transform (the zeros of the
// padding stay zeros): nothing, x·scale + shift per input channel, or max(that, 0) (NaN
// kept) — a batch norm and ReLU the input has not had yet.
enum class Prologue { kNone, kAffine, kAffineRelu };

struct InputAffine {
  const float *scale, *shift;  // (C_in,) each; unread for Prologue::kNone
};

// One tile's V[ξ][ci] = (Bᵀ·d·B)[ξ], all its input channels: d the α×α input at `origin`
// (through the prologue P), rows h0…, columns w0… of its image, zero outside unless
// kInterior (it lies inside).
template <int M, int Bytes, bool kInterior, Prologue P>
MLIFAST_WINOGRAD_INLINE void transform_input_tile(const float* origin, const Geometry& g, int64_t h0, int64_t w0,
                                                  int64_t plane, const InputAffine& affine, float* v) {
  MLIFAST_WINOGRAD_VECTOR;
  using T = Transforms<M>;
  constexpr int A = T::kAlpha;
  constexpr int64_t kWidth = Bytes / sizeof(float);
  alignas(64) static const float kZeros[kWidth] = {};
  const int64_t C = g.in_channels;
  int64_t row = g.width * C;
  bool row_in[A], col_in[A];
  for (int a = 0; a < A; ++a) {
    row_in[a] = kInterior || (h0 + a >= 0 && h0 + a < g.height);
    col_in[a] = kInterior || (w0 + a >= 0 && w0 + a < g.width);
  }
  for (int64_t c = 0; c < C; c += kWidth) {
    recompute_offsets_from(row);
    recompute_offsets_from(plane);
    Vec scale{}, shift{};
    if constexpr (P != Prologue::kNone) scale = load<Bytes>(affine.scale + c), shift = load<Bytes>(affine.shift + c);
    Vec rows[A][A];  // Bᵀ·d
#pragma GCC unroll 8
    for (int b = 0; b < A; ++b) {
      Vec column[A], transformed[A];
#pragma GCC unroll 8
      for (int a = 0; a < A; ++a) {
        const bool inside = kInterior || (row_in[a] && col_in[b]);
        const float* at = origin + a * row + b * C + c;
        column[a] = load<Bytes>(inside ? at : kZeros);
        if constexpr (P != Prologue::kNone) {
          Vec mapped = column[a] * scale + shift;
          if constexpr (P == Prologue::kAffineRelu) mapped = mapped < Vec{} ? Vec{} : mapped;
          column[a] = inside ? mapped : Vec{};
        }
      }
      T::input(column, transformed);
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i) rows[i][b] = transformed[i];
    }
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i) {
      Vec transformed[A];
      T::input(rows[i], transformed);
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) {
        store<Bytes>(v + (i * A + j) * plane + c, transformed[j]);
        __builtin_prefetch(v + (i * A + j) * plane + c + kStoreAhead, 1, 3);
      }
    }
  }
}

// V[ξ][t][ci] = (Bᵀ·d·B)[ξ] of block tile t's input tile d (zero outside the image, and for
// the tiles past the batch's last, up to `rows`: those the GEMMs read); `stride` (≥ C_in)
// floats from one tile to the next.
template <int M, int Bytes, Prologue P>
MLIFAST_WINOGRAD_INLINE void transform_input(const float* x, const Geometry& g, const InputAffine& affine,
                                             int64_t first, int64_t tiles, int64_t rows, int64_t tiles_h,
                                             int64_t tiles_w, int64_t stride, float* V) {
  MLIFAST_WINOGRAD_VECTOR;
  constexpr int A = Transforms<M>::kAlpha;
  const int64_t C = g.in_channels, plane = plane_floats(stride);
  TileWalk p(first, tiles_h, tiles_w, M);
  for (int64_t t = 0; t < rows; ++t, p.next(tiles_h)) {
    float* v = V + t * stride;
    if (t >= tiles) {
      for (int xi = 0; xi < A * A; ++xi) std::fill(v + xi * plane, v + xi * plane + C, 0.0f);
      continue;
    }
    const int64_t h0 = p.row - g.pad_h, w0 = p.col - g.pad_w;
    const float* origin = x + ((p.image * g.height + h0) * g.width + w0) * C;
    if (h0 >= 0 && w0 >= 0 && h0 + A <= g.height && w0 + A <= g.width) {
      transform_input_tile<M, Bytes, true, P>(origin, g, h0, w0, plane, affine, v);
    } else {
      transform_input_tile<M, Bytes, false, P>(origin, g, h0, w0, plane, affine, v);
    }
  }
}

// Mb[ξ][t][co] = Σ_ci V[ξ][t][ci]·U[ξ][ci][co] for the first `rows` tiles (a multiple of
// kRowTiles), kRowTiles tiles and kVectors vectors of output channels at a time, their sums
// in registers. V's tiles lie kStride floats apart
// (0: `stride`): a constant stride lets each tile's value be read at a fixed offset from one
// pointer, where 16 tiles at a variable stride took a register each and spilled.
template <int Bytes, int kRowTiles, int kVectors, int kStride>
MLIFAST_WINOGRAD_INLINE void multiply_position(const float* __restrict__ V, const float* __restrict__ U,
                                               int64_t C_in, int64_t C_out, int64_t stride, int64_t rows,
                                               float* __restrict__ Mb) {
  MLIFAST_WINOGRAD_VECTOR;
  constexpr int64_t kWidth = Bytes / sizeof(float);
  const int64_t step = kStride ? kStride : stride;
  for (int64_t co = 0; co < C_out; co += kVectors * kWidth) {
    for (int64_t t0 = 0; t0 < rows; t0 += kRowTiles) {
      Vec acc[kRowTiles][kVectors] = {};
      const float* v = V + t0 * step;
      for (int64_t ci = 0; ci < C_in; ++ci) {
        Vec u[kVectors];
#pragma GCC unroll 8
        for (int j = 0; j < kVectors; ++j) u[j] = load<Bytes>(U + ci * C_out + co + j * kWidth);
#pragma GCC unroll 16
        for (int t = 0; t < kRowTiles; ++t) {
          const float s = v[t * step + ci];
#pragma GCC unroll 8
          for (int j = 0; j < kVectors; ++j) acc[t][j] += u[j] * s;
        }
      }
#pragma GCC unroll 16
      for (int t = 0; t < kRowTiles; ++t)
#pragma GCC unroll 8
        for (int j = 0; j < kVectors; ++j) store<Bytes>(Mb + (t0 + t) * C_out + co + j * kWidth, acc[t][j]);
    }
  }
}

// Tiles a GEMM step holds in registers with the blocking C_out allows (4, 2 or 1 vectors of
// output channels).
template <int Bytes>
MLIFAST_WINOGRAD_INLINE int64_t row_tiles(int64_t C_out) {
  constexpr int64_t kWidth = Bytes / sizeof(float);
  return C_out % (4 * kWidth) == 0 ? 6 : C_out % (2 * kWidth) == 0 ? 12 : 16;
}

// The GEMM of one position's first `rows` tiles (a multiple of row_tiles(C_out)) with the
// register blocking C_out allows.
template <int Bytes, int kStride>
MLIFAST_WINOGRAD_INLINE void multiply_position(const float* V, const float* U, int64_t C_in, int64_t C_out,
                                               int64_t stride, int64_t rows, float* Mb) {
  switch (row_tiles<Bytes>(C_out)) {
    case 6: multiply_position<Bytes, 6, 4, kStride>(V, U, C_in, C_out, stride, rows, Mb); break;
    case 12: multiply_position<Bytes, 12, 2, kStride>(V, U, C_in, C_out, stride, rows, Mb); break;
    default: multiply_position<Bytes, 16, 1, kStride>(V, U, C_in, C_out, stride, rows, Mb);
  }
}

// Floats from one tile's transformed input to the next: C_in rounded up to a power of two
// from 16 to 512 (a constant the GEMM is compiled for), else C_in.
MLIFAST_WINOGRAD_INLINE int64_t input_stride(int64_t C_in) {
  for (int64_t s = 16; s <= 512; s *= 2)
    if (C_in <= s) return s;
  return C_in;
}

// y = Aᵀ·Mb·A + bias (+ addend) (ReLU: max(·, 0), NaN kept) for the block's real tiles,
// clipped to the image.
template <int M, int Bytes, bool kAdd, bool kRelu>
MLIFAST_WINOGRAD_INLINE void transform_output(const float* Mb, const float* bias, const float* addend,
                                              const Geometry& g, int64_t first, int64_t tiles, int64_t tiles_h,
                                              int64_t tiles_w, float* y) {
  MLIFAST_WINOGRAD_VECTOR;
  using T = Transforms<M>;
  constexpr int A = T::kAlpha;
  constexpr int64_t kWidth = Bytes / sizeof(float);
  const int64_t C = g.out_channels, Ho = g.out_height(), Wo = g.out_width();
  int64_t plane = plane_floats(C), row = Wo * C;
  TileWalk p(first, tiles_h, tiles_w, M);
  for (int64_t t = 0; t < tiles; ++t, p.next(tiles_h)) {
    const int rows = int(std::min<int64_t>(M, Ho - p.row)), cols = int(std::min<int64_t>(M, Wo - p.col));
    const int64_t base = ((p.image * Ho + p.row) * Wo + p.col) * C;
    for (int64_t c = 0; c < C; c += kWidth) {
      recompute_offsets_from(plane);
      recompute_offsets_from(row);
      Vec columns[M][A];  // Aᵀ·m
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) {
        Vec column[A], transformed[M];
#pragma GCC unroll 8
        for (int i = 0; i < A; ++i) column[i] = load<Bytes>(Mb + (i * A + j) * plane + t * C + c);
        T::output(column, transformed);
#pragma GCC unroll 8
        for (int r = 0; r < M; ++r) columns[r][j] = transformed[r];
      }
      const Vec b = bias == nullptr ? Vec{} : load<Bytes>(bias + c);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        if (r >= rows) break;
        Vec out[M];
        T::output(columns[r], out);
#pragma GCC unroll 8
        for (int s = 0; s < M; ++s) {
          if (s >= cols) break;
          Vec v = out[s] + b;
          const int64_t at = base + r * row + s * C + c;
          if constexpr (kAdd) v += load<Bytes>(addend + at);
          if constexpr (kRelu) v = v < Vec{} ? Vec{} : v;
          store<Bytes>(y + at, v);
        }
      }
    }
  }
}

// Σ over `pixels` consecutive outputs at y (C floats apart) of kVectors vectors of channels
// of x into `sum` (kDeviations: of d = x − centre into `sum` and of d² into `squares`): a
// few sums a vector in float, so that the additions do not wait on each other, taken into
// float64 every 16 outputs.
template <int Bytes, int kVectors, bool kDeviations>
MLIFAST_WINOGRAD_INLINE void add_run(const float* y, int64_t pixels, int64_t C,
                                     const typename Vector<Bytes>::type* centre, typename Wide<Bytes>::type* sum,
                                     typename Wide<Bytes>::type* squares) {
  MLIFAST_WINOGRAD_VECTOR;
  typedef typename Wide<Bytes>::type Doubles;
  constexpr int64_t kWidth = Bytes / sizeof(float), kSums = kDeviations ? 2 : 4, kTaken = 16;
  for (int64_t s0 = 0; s0 < pixels; s0 += kTaken) {
    const int64_t s1 = std::min(pixels, s0 + kTaken);
    Vec sums[kVectors][kSums] = {}, sums2[kVectors][kSums] = {};
    const auto add = [&](int64_t s, int u, int j) MLIFAST_WINOGRAD_LAMBDA {
      const Vec v = load<Bytes>(y + s * C + j * kWidth);
      if constexpr (kDeviations) {
        const Vec d = v - centre[j];
        sums[j][u] += d, sums2[j][u] += d * d;
      } else {
        sums[j][u] += v;
      }
    };
    int64_t s = s0;
    for (; s + kSums <= s1; s += kSums) {
#pragma GCC unroll 8
      for (int u = 0; u < kSums; ++u) {
#pragma GCC unroll 8
        for (int j = 0; j < kVectors; ++j) add(s + u, u, j);
      }
    }
    for (; s < s1; ++s) {
#pragma GCC unroll 8
      for (int j = 0; j < kVectors; ++j) add(s, 0, j);
    }
#pragma GCC unroll 8
    for (int j = 0; j < kVectors; ++j) {
#pragma GCC unroll 8
      for (int u = 1; u < kSums; ++u) sums[j][0] += sums[j][u], sums2[j][0] += sums2[j][u];
      sum[j] += __builtin_convertvector(sums[j][0], Doubles);
      if constexpr (kDeviations) squares[j] += __builtin_convertvector(sums2[j][0], Doubles);
    }
  }
}

// `add_run` over the block's outputs, a row of a run of tiles at a time (a run: the block's
// tiles in one row of tiles, whose outputs lie in consecutive memory row by row).
template <int M, int Bytes, int kVectors, bool kDeviations>
MLIFAST_WINOGRAD_INLINE void add_block(const float* y, const Geometry& g, int64_t first, int64_t tiles,
                                       int64_t tiles_h, int64_t tiles_w, const typename Vector<Bytes>::type* centre,
                                       typename Wide<Bytes>::type* sum, typename Wide<Bytes>::type* squares) {
  const int64_t C = g.out_channels, Ho = g.out_height(), Wo = g.out_width();
  TileWalk p(first, tiles_h, tiles_w, M);
  for (int64_t t = 0; t < tiles;) {
    const int64_t run = std::min(tiles - t, tiles_w - p.col / M), rows = std::min<int64_t>(M, Ho - p.row);
    const int64_t pixels = std::min(Wo, p.col + run * M) - p.col;
    for (int64_t r = 0; r < rows; ++r)
      add_run<Bytes, kVectors, kDeviations>(y + ((p.image * Ho + p.row + r) * Wo + p.col) * C, pixels, C, centre, sum,
                                            squares);
    for (int64_t i = 0; i < run; ++i) p.next(tiles_h);
    t += run;
  }
}

// Mean and M2 of one channel over the block's outputs (y at the channel) in float64, two
// passes: where float's sums overflow.
template <int M>
MLIFAST_WINOGRAD_INLINE void channel_moments_float64(const float* y, const Geometry& g, int64_t first, int64_t tiles,
                                                     int64_t tiles_h, int64_t tiles_w, double n, double& mean,
                                                     double& m2) {
  const int64_t C = g.out_channels, Ho = g.out_height(), Wo = g.out_width();
  const auto each = [&](auto&& f) {
    TileWalk p(first, tiles_h, tiles_w, M);
    for (int64_t t = 0; t < tiles; ++t, p.next(tiles_h))
      for (int64_t r = p.row; r < std::min(Ho, p.row + M); ++r)
        for (int64_t c = p.col; c < std::min(Wo, p.col + M); ++c) f(double(y[((p.image * Ho + r) * Wo + c) * C]));
  };
  double sum = 0, squares = 0;
  each([&](double v) { sum += v; });
  mean = sum / n;
  each([&](double v) { squares += (v - mean) * (v - mean); });
  m2 = squares;
}

// Mean and M2 of kVectors vectors of channels over the block's outputs (y at the first
// channel): a pass for the mean, then one for the deviations d = x − c about it rounded to
// float (c), from which mean = c + Σd/n and M2 = Σd² − (Σd)²/n (no cancellation: c lies
// within rounding of the mean; M2 ≥ 0).
template <int M, int Bytes, int kVectors>
MLIFAST_WINOGRAD_INLINE void chunk_moments(const float* y, const Geometry& g, int64_t first, int64_t tiles,
                                           int64_t tiles_h, int64_t tiles_w, double n, double* mean, double* m2) {
  MLIFAST_WINOGRAD_VECTOR;
  typedef typename Wide<Bytes>::type Doubles;
  constexpr int64_t kWidth = Bytes / sizeof(float);
  Vec centre[kVectors] = {};
  Doubles sum[kVectors] = {}, deviations[kVectors] = {}, squares[kVectors] = {};
  add_block<M, Bytes, kVectors, false>(y, g, first, tiles, tiles_h, tiles_w, centre, sum, nullptr);
  for (int j = 0; j < kVectors; ++j) centre[j] = __builtin_convertvector(sum[j] / n, Vec);
  add_block<M, Bytes, kVectors, true>(y, g, first, tiles, tiles_h, tiles_w, centre, deviations, squares);
  for (int j = 0; j < kVectors; ++j) {
    const Doubles mu = __builtin_convertvector(centre[j], Doubles) + deviations[j] / n;
    Doubles spread = squares[j] - deviations[j] * deviations[j] / n;
    spread = spread < Doubles{} ? Doubles{} : spread;  // (NaN kept)
    std::memcpy(mean + j * kWidth, &mu, sizeof(Doubles));
    std::memcpy(m2 + j * kWidth, &spread, sizeof(Doubles));
  }
  for (int64_t i = 0; i < kVectors * kWidth; ++i) {
    if (!std::isfinite(mean[i] + m2[i]))  // (float's sums overflowed; or the outputs are not finite)
      channel_moments_float64<M>(y + i, g, first, tiles, tiles_h, tiles_w, n, mean[i], m2[i]);
  }
}

// Per-channel moments of the block's outputs, read back from y while they are in cache
// (a batch norm's statistics without a pass over the output of its own): `count` values a
// channel, their float64 `mean` and sum of squared deviations `m2` (C_out each).
template <int M, int Bytes>
MLIFAST_WINOGRAD_INLINE void block_moments(const float* y, const Geometry& g, int64_t first, int64_t tiles,
                                           int64_t tiles_h, int64_t tiles_w, double* count, double* mean,
                                           double* m2) {
  constexpr int64_t kWidth = Bytes / sizeof(float);
  const int64_t Ho = g.out_height(), Wo = g.out_width();
  double n = 0;
  TileWalk p(first, tiles_h, tiles_w, M);
  for (int64_t t = 0; t < tiles; ++t, p.next(tiles_h))
    n += double(std::min<int64_t>(M, Ho - p.row) * std::min<int64_t>(M, Wo - p.col));
  *count = n;
  int64_t c = 0;
  for (; c + 4 * kWidth <= g.out_channels; c += 4 * kWidth)
    chunk_moments<M, Bytes, 4>(y + c, g, first, tiles, tiles_h, tiles_w, n, mean + c, m2 + c);
  for (; c < g.out_channels; c += kWidth)
    chunk_moments<M, Bytes, 1>(y + c, g, first, tiles, tiles_h, tiles_w, n, mean + c, m2 + c);
}

// What a block reads from memory and writes (its input rows, its addend and output rows,
// each a range of whole rows of its images), fetched into the L2 cache while the thread's
// block before it multiplies: in a network's pass the activations are seldom in cache, and
// each block waited on them at its first and last steps. 4 points of 64 images of 16 × 32 ×
// 32 with an addend, the cache flushed before: 4.6–4.9 → 3.9–4.2 ms a call (2.6–2.9 in
// cache); W2 2.17–2.40 → 1.94–2.05 s. Two blocks ahead, or into L1 too: within noise.
struct Ahead {
  static constexpr int kRanges = 3;
  const float* begin[kRanges] = {};
  int64_t lines[kRanges] = {};
  bool write[kRanges] = {};

  // The share `part` of `parts` of every range's cache lines.
  MLIFAST_WINOGRAD_INLINE void fetch(int part, int parts) const {
    for (int r = 0; r < kRanges; ++r) {
      const int64_t end = lines[r] * (part + 1) / parts;
      for (int64_t line = lines[r] * part / parts; line < end; ++line) {
        if (write[r]) __builtin_prefetch(begin[r] + line * 16, 1, 2);
        else __builtin_prefetch(begin[r] + line * 16, 0, 2);
      }
    }
  }
};

// Ahead of the tiles [first, first + tiles) of the images x, y and addend (or nullptr).
template <int M>
Ahead block_ahead(const float* x, const float* addend, const float* y, const Geometry& g, int64_t first,
                  int64_t tiles) {
  const int64_t tiles_h = (g.out_height() + M - 1) / M, tiles_w = (g.out_width() + M - 1) / M;
  const int64_t Ho = g.out_height(), Wo = g.out_width();
  const TileWalk head(first, tiles_h, tiles_w, M), tail(first + tiles - 1, tiles_h, tiles_w, M);
  const auto clamped = [](int64_t row, int64_t rows) { return std::min(std::max(row, int64_t(0)), rows); };
  const int64_t in_begin = (head.image * g.height + clamped(head.row - g.pad_h, g.height)) * g.width * g.in_channels;
  const int64_t in_end = (tail.image * g.height + clamped(tail.row + M + 2 - g.pad_h, g.height)) * g.width * g.in_channels;
  const int64_t out_begin = (head.image * Ho + head.row) * Wo * g.out_channels;
  const int64_t out_end = (tail.image * Ho + std::min(tail.row + M, Ho)) * Wo * g.out_channels;
  const auto lines = [](int64_t floats) { return std::max(floats, int64_t(0)) / 16; };
  Ahead a;
  a.begin[0] = x + in_begin, a.lines[0] = lines(in_end - in_begin);
  a.begin[1] = y + out_begin, a.lines[1] = lines(out_end - out_begin), a.write[1] = true;
  if (addend != nullptr) a.begin[2] = addend + out_begin, a.lines[2] = lines(out_end - out_begin);
  return a;
}

// The tiles [first, first + tiles) (tiles ≤ kTiles) through the three steps (the input
// through the prologue P, the output through the bias, the addend and the ReLU); V and Mb are
// α²·plane_floats(input_stride(C_in)) and α²·plane_floats(C_out) floats of scratch.
// `moments` (or nullptr): 1 + 2·C_out doubles that receive the block's count, mean and m2
// (block_moments).
template <int M, int Bytes, Prologue P, bool kAdd, bool kRelu>
MLIFAST_WINOGRAD_INLINE void convolve_block(const float* x, const InputAffine& affine, const float* U,
                                            const float* bias, const float* addend, const Geometry& g, int64_t first,
                                            int64_t tiles, float* V, float* Mb, float* y, double* moments,
                                            const Ahead& ahead) {
  constexpr int A = Transforms<M>::kAlpha;
  const int64_t tiles_h = (g.out_height() + M - 1) / M, tiles_w = (g.out_width() + M - 1) / M;
  const int64_t Ci = g.in_channels, Co = g.out_channels, stride = input_stride(Ci);
  // (the GEMMs take the block's tiles rounded up to their register blocking, not kTiles: a
  // call of 16–32 tiles, or a last block, would multiply zeros)
  const int64_t step = row_tiles<Bytes>(Co), rows = std::min(kTiles, (tiles + step - 1) / step * step);
  transform_input<M, Bytes, P>(x, g, affine, first, tiles, rows, tiles_h, tiles_w, stride, V);
  for (int xi = 0; xi < A * A; ++xi) {
    ahead.fetch(xi, A * A);
    const float* v = V + xi * plane_floats(stride);
    const float* u = U + xi * weight_plane_floats(Ci, Co);
    float* mb = Mb + xi * plane_floats(Co);
    switch (stride) {
      case 16: multiply_position<Bytes, 16>(v, u, Ci, Co, stride, rows, mb); break;
      case 32: multiply_position<Bytes, 32>(v, u, Ci, Co, stride, rows, mb); break;
      case 64: multiply_position<Bytes, 64>(v, u, Ci, Co, stride, rows, mb); break;
      case 128: multiply_position<Bytes, 128>(v, u, Ci, Co, stride, rows, mb); break;
      case 256: multiply_position<Bytes, 256>(v, u, Ci, Co, stride, rows, mb); break;
      case 512: multiply_position<Bytes, 512>(v, u, Ci, Co, stride, rows, mb); break;
      default: multiply_position<Bytes, 0>(v, u, Ci, Co, stride, rows, mb);
    }
  }
  transform_output<M, Bytes, kAdd, kRelu>(Mb, bias, addend, g, first, tiles, tiles_h, tiles_w, y);
  if (moments != nullptr)
    block_moments<M, Bytes>(y, g, first, tiles, tiles_h, tiles_w, moments, moments + 1, moments + 1 + Co);
}

}  // namespace winograd
}  // namespace mlifast
