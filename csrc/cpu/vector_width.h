// The vector width of the CPU kernels that keep one copy per instruction set.
#pragma once

#include <algorithm>
#include <cstdlib>

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

}  // namespace mlifast
