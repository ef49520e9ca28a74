// Each point's weight formed in registers: the body of mlifast::multipoint_linear's CPU
// kernel for a few float32 rows per point (csrc/cpu/multipoint_linear.cpp), apart from ATen.
//
// y[k, r, :] = x[k, r, :]·(W + Σ_j c_kj·D_j)ᵀ + b_k. The weight and its J directions are
// packed, kTileVectors vectors of output features at a time, into panels (input feature
// major) in the thread's cache. Point k's weight is formed one vector at a time in
// registers, right before that vector multiplies up to tile_rows() of the point's rows:
// 1 + J/rows multiply-adds per useful one, where the stacked form's two GEMMs take J + 1,
// and the weights are read from memory once per call, where forming each W_k whole in
// memory reads them once per point.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "vector_width.h"

namespace mlifast {
namespace formed {

struct Job {
  const float* x;     // (K, R, I): point k's rows
  float* interleaved;  // interleaved_floats(): x's rows as the multiplications read them
  const float* w;     // (O, I)
  const float* d;     // (J, O, I)
  const float* c;     // (K, J)
  const float* bias;  // (K, O) point k's bias, or nullptr
  float* y;           // (K, R, O)
  int64_t K, R, I, O, J;
  bool relu;  // y = max(y, 0), NaN kept
};

// A register tile: tile_rows() rows by kTileVectors vectors of output features. 8 × 2
// vectors are 16 of AVX-512's 32 registers (enough independent sums to hide the FMA
// latency on two ports); AVX2 and SSE have 16 registers and take 6 rows.
constexpr int kTileVectors = 2;
template <int Bytes>
constexpr int tile_features() {
  return kTileVectors * Bytes / 4;
}
template <int Bytes>
constexpr int tile_rows() {
  return Bytes == 64 ? 8 : 6;
}

// Input features a register tile takes before it moves to the next point's rows: one
// slice of the panels, (J + 1)·kDepth·tile_features() floats, stays in L2 while every
// point's rows go through it (J = 1 at AVX-512: 256 KiB). Deeper was faster (K = 64,
// 8 rows, 4096 × 1024: 167, 180, 198, 208, 216 GFLOP/s at 64, 128, …, 1024).
constexpr int64_t kDepth = 1024;

inline int64_t row_blocks(int64_t rows, int64_t block) { return (rows + block - 1) / block; }

// Floats of Job::interleaved: every point's rows in blocks of tile_rows(), zero-padded.
template <int Bytes>
int64_t interleaved_floats(const Job& j) {
  return j.K * row_blocks(j.R, tile_rows<Bytes>()) * tile_rows<Bytes>() * j.I;
}

// Job::interleaved of points [begin, end): block b's rows r of x, input feature i at
// (b·I + i)·MR + r, so that a multiplication's broadcasts read one cache line per
// 16 / MR input features, not one per row.
template <int Bytes>
void interleave_rows(const Job& j, int64_t begin, int64_t end) {
  constexpr int MR = tile_rows<Bytes>();
  const int64_t blocks = row_blocks(j.R, MR);
  for (int64_t k = begin; k < end; ++k) {
    for (int64_t b = 0; b < blocks; ++b) {
      float* out = j.interleaved + (k * blocks + b) * j.I * MR;
      for (int r = 0; r < MR; ++r) {
        const int64_t row = b * MR + r;
        if (row < j.R) {
          const float* in = j.x + (k * j.R + row) * j.I;
          for (int64_t i = 0; i < j.I; ++i) out[i * MR + r] = in[i];
        } else {
          for (int64_t i = 0; i < j.I; ++i) out[i * MR + r] = 0.0f;
        }
      }
    }
  }
}

// Floats of scratch a thread needs: the panels, and the outputs of the last block where
// it is partial and the thread's.
template <int Bytes>
int64_t scratch_floats(const Job& j, bool takes_last_block) {
  constexpr int NB = tile_features<Bytes>();
  return ((j.J + 1) * j.I + (takes_last_block && j.O % NB != 0 ? j.K * j.R : 0)) * NB;
}

// Walks the next block's rows of the weight and its directions (planes, rows, cache
// lines), a prefetch into L2 a step: spread over a block's multiplications, they bring in
// the next block's weights while this one computes, where the pack would stall on memory.
struct Prefetcher {
  const float* w;
  const float* d;
  int64_t O, I, planes, lines_per_row;
  const float* row_ptr = nullptr;
  int64_t o0 = 0, rows = 0, plane = 0, row = 0, line = 0;

  void start(int64_t first, int64_t width) {
    o0 = first, rows = width, plane = row = line = 0;
    row_ptr = width > 0 ? w + o0 * I : nullptr;
  }
  MLIFAST_ALWAYS_INLINE void step() {
    if (row_ptr == nullptr) return;
    __builtin_prefetch(row_ptr + line * 16, 0, 2);
    if (++line < lines_per_row) return;
    line = 0, row_ptr += I;
    if (++row < rows) return;
    row = 0;
    row_ptr = ++plane < planes ? d + ((plane - 1) * O + o0) * I : nullptr;
  }
};

// C[r, 0:NB] (+)= Σ_i x[i, r]·(P_0[i] + Σ_j c_j·P_j[i]) for r < Rows, i < depth (x: rows
// interleaved, tile_rows() floats an input feature, see interleave_rows); the
// panels P_m lie `plane` floats apart, NB floats a row. C starts from what it holds;
// `relu` clamps it at the end.
template <int Bytes, int Rows, bool OneDirection>
MLIFAST_ALWAYS_INLINE void multiply(const float* x, const float* panel, int64_t plane, int64_t depth,
                                    const float* c, int64_t J, float* C, int64_t ldc, bool relu,
                                    Prefetcher& pf, int64_t every) {
  typedef typename Vector<Bytes>::type Vec;
  constexpr int V = Bytes / 4;
  constexpr int NB = tile_features<Bytes>();
  constexpr int NV = kTileVectors;
  Vec acc[Rows][NV];
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = load<Bytes>(C + r * ldc + v * V);
  }
  const float c0 = c[0];
  int64_t countdown = every;
  for (int64_t i = 0; i < depth; ++i) {
    if (--countdown == 0) countdown = every, pf.step();
    const float* p = panel + i * NB;
    Vec w[NV];
    for (int v = 0; v < NV; ++v) w[v] = load<Bytes>(p + v * V);
    if constexpr (OneDirection) {
      for (int v = 0; v < NV; ++v) w[v] += load<Bytes>(p + plane + v * V) * c0;
    } else {
      for (int64_t jj = 0; jj < J; ++jj) {
        const float* q = p + (jj + 1) * plane;
        for (int v = 0; v < NV; ++v) w[v] += load<Bytes>(q + v * V) * c[jj];
      }
    }
    for (int r = 0; r < Rows; ++r) {
      const float xr = x[i * tile_rows<Bytes>() + r];
      for (int v = 0; v < NV; ++v) acc[r][v] += w[v] * xr;
    }
  }
  if (relu) {
    const Vec zero = {};
    for (int r = 0; r < Rows; ++r) {
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v] < zero ? zero : acc[r][v];
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < NV; ++v) store<Bytes>(C + r * ldc + v * V, acc[r][v]);
  }
}

template <int Bytes, bool OneDirection>
MLIFAST_ALWAYS_INLINE void multiply_rows(int rows, const float* x, const float* panel, int64_t plane,
                                         int64_t depth, const float* c, int64_t J, float* C, int64_t ldc,
                                         bool relu, Prefetcher& pf, int64_t every) {
#define MLIFAST_FORMED_ROWS(n) \
  case n:                      \
    return multiply<Bytes, n, OneDirection>(x, panel, plane, depth, c, J, C, ldc, relu, pf, every);
  switch (rows) {
    MLIFAST_FORMED_ROWS(1)
    MLIFAST_FORMED_ROWS(2)
    MLIFAST_FORMED_ROWS(3)
    MLIFAST_FORMED_ROWS(4)
    MLIFAST_FORMED_ROWS(5)
    MLIFAST_FORMED_ROWS(6)
    default:
      if constexpr (tile_rows<Bytes>() == 8) {
        if (rows == 7) return multiply<Bytes, 7, OneDirection>(x, panel, plane, depth, c, J, C, ldc, relu, pf, every);
        return multiply<Bytes, 8, OneDirection>(x, panel, plane, depth, c, J, C, ldc, relu, pf, every);
      }
  }
#undef MLIFAST_FORMED_ROWS
}

#if defined(__clang__) || __GNUC__ >= 12
#define MLIFAST_FORMED_SHUFFLES 1

// The V×V block of floats in r (V = Bytes / 4 vectors of V) transposed in place: at
// each stage H = V/2, …, 1, rows a and a + H (bit H of a clear) swap their off-diagonal
// H×H blocks. V·log2(V) two-vector shuffles (vpermt2ps at AVX-512): 4 per 16 floats.
template <int Bytes, int H, std::size_t... M>
MLIFAST_ALWAYS_INLINE void swap_blocks(typename Vector<Bytes>::type& a, typename Vector<Bytes>::type& b,
                                       std::index_sequence<M...>) {
  constexpr int V = Bytes / 4;
  const typename Vector<Bytes>::type x = a, y = b;
  a = __builtin_shufflevector(x, y, ((M & H) ? V + M - H : M)...);
  b = __builtin_shufflevector(x, y, ((M & H) ? V + M : M + H)...);
}

template <int Bytes, int H = Bytes / 8>
MLIFAST_ALWAYS_INLINE void transpose(typename Vector<Bytes>::type* r) {
  constexpr int V = Bytes / 4;
  for (int a = 0; a < V; ++a) {
    if ((a & H) == 0) swap_blocks<Bytes, H>(r[a], r[a + H], std::make_index_sequence<V>());
  }
  if constexpr (H > 1) transpose<Bytes, H / 2>(r);
}
#endif

// panel[i, o] = src[(o0 + o)·I + i] for o < width, 0 for width ≤ o < NB: the weight's
// rows o0… transposed, V×V blocks in registers where the compiler has the shuffles.
template <int Bytes>
MLIFAST_ALWAYS_INLINE void pack(float* panel, const float* src, int64_t I, int64_t o0, int64_t width) {
  constexpr int NB = tile_features<Bytes>();
  int64_t i0 = 0;
#ifdef MLIFAST_FORMED_SHUFFLES
  constexpr int V = Bytes / 4;
  typename Vector<Bytes>::type r[V];
  for (; i0 + V <= I; i0 += V) {
    for (int half = 0; half < NB / V; ++half) {
      for (int t = 0; t < V; ++t) {
        const int64_t o = half * V + t;
        r[t] = o < width ? load<Bytes>(src + (o0 + o) * I + i0) : typename Vector<Bytes>::type{};
      }
      transpose<Bytes>(r);
      for (int t = 0; t < V; ++t) store<Bytes>(panel + (i0 + t) * NB + half * V, r[t]);
    }
  }
#endif
  for (; i0 < I; ++i0) {
    for (int64_t o = 0; o < NB; ++o) panel[i0 * NB + o] = o < width ? src[(o0 + o) * I + i0] : 0.0f;
  }
}

// Output features [begin·NB, end·NB) of every point's rows, in blocks of NB. `scratch`:
// scratch_floats<Bytes>(j, end takes the last block) floats, this thread's own.
template <int Bytes, bool OneDirection>
MLIFAST_ALWAYS_INLINE void blocks_with(const Job& j, int64_t begin, int64_t end, float* scratch) {
  constexpr int NB = tile_features<Bytes>();
  constexpr int MR = tile_rows<Bytes>();
  const int64_t I = j.I, O = j.O, plane = I * NB, rows = j.K * j.R;
  float* panel = scratch;
  float* partial = scratch + (j.J + 1) * plane;
  const int64_t lines_per_row = row_blocks(I, 16);
  Prefetcher pf{j.w, j.d, O, I, j.J + 1, lines_per_row};
  // Multiply-add steps a block takes, over the cache lines of a block's weights.
  const int64_t every = std::max<int64_t>(1, I * j.K * row_blocks(j.R, MR) / ((j.J + 1) * NB * lines_per_row));
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o0 = b * NB, width = std::min<int64_t>(NB, O - o0);
    pf.start(o0 + NB, b + 1 < end ? std::min<int64_t>(NB, O - o0 - NB) : 0);
    pack<Bytes>(panel, j.w, I, o0, width);
    for (int64_t jj = 0; jj < j.J; ++jj) pack<Bytes>(panel + (jj + 1) * plane, j.d + jj * O * I, I, o0, width);
    float* C = width == NB ? j.y + o0 : partial;
    const int64_t ldc = width == NB ? O : NB;
    for (int64_t row = 0; row < rows; ++row) {
      float* out = C + row * ldc;
      const float* bias = j.bias != nullptr ? j.bias + (row / j.R) * O + o0 : nullptr;
      for (int64_t o = 0; o < NB; ++o) out[o] = bias != nullptr && o < width ? bias[o] : 0.0f;
    }
    for (int64_t i0 = 0; i0 < I; i0 += kDepth) {
      const int64_t depth = std::min<int64_t>(kDepth, I - i0);
      const bool relu = j.relu && i0 + depth == I;
      for (int64_t k = 0; k < j.K; ++k) {
        for (int64_t r0 = 0; r0 < j.R; r0 += MR) {
          const int64_t row = k * j.R + r0;
          multiply_rows<Bytes, OneDirection>(static_cast<int>(std::min<int64_t>(MR, j.R - r0)),
                                             j.interleaved + ((k * row_blocks(j.R, MR) + r0 / MR) * I + i0) * MR,
                                             panel + i0 * NB, plane, depth, j.c + k * j.J, j.J, C + row * ldc, ldc,
                                             relu, pf, every);
        }
      }
    }
    if (width < NB) {
      for (int64_t row = 0; row < rows; ++row) std::memcpy(j.y + row * O + o0, partial + row * NB, width * sizeof(float));
    }
  }
}

template <int Bytes>
MLIFAST_ALWAYS_INLINE void blocks(const Job& j, int64_t begin, int64_t end, float* scratch) {
  if (j.J == 1) blocks_with<Bytes, true>(j, begin, end, scratch);
  else blocks_with<Bytes, false>(j, begin, end, scratch);
}

}  // namespace formed
}  // namespace mlifast
