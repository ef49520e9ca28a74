// The vector width of the CPU kernels that keep one copy per instruction set.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

// A function inlined into its caller, and so compiled for the caller's instruction set
// (the kernels keep one copy per set through `target` attributes).
#define MLIFAST_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace mlifast {

// In bytes: the widest this CPU has (64: AVX-512, 32: AVX2 with FMA, 16: the x86-64
// baseline), or a narrower one named by MLIFAST_VECTOR_BYTES (16, 32: the tests run every
// variant).
inline int vector_bytes() {
  static const int widest = __builtin_cpu_supports("avx512f") ? 64
                            : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 32 : 16;
  const char* asked = std::getenv("MLIFAST_VECTOR_BYTES");
  const int bytes = asked == nullptr ? widest : std::atoi(asked);
  return bytes == 16 || bytes == 32 || bytes == 64 ? std::min(bytes, widest) : widest;
}

// A vector of `Bytes` bytes of floats (GCC's vector extensions; a template argument of
// such a type loses its attribute, so functions take Bytes and name the type from it),
// and its unaligned load and store.
template <int Bytes>
struct Vector {
  typedef float type __attribute__((vector_size(Bytes)));
};

template <int Bytes>
MLIFAST_ALWAYS_INLINE typename Vector<Bytes>::type load(const float* p) {
  typename Vector<Bytes>::type v;
  std::memcpy(&v, p, Bytes);
  return v;
}

template <int Bytes>
MLIFAST_ALWAYS_INLINE void store(float* p, typename Vector<Bytes>::type v) {
  std::memcpy(p, &v, Bytes);
}

}  // namespace mlifast
