// Stand-in for a CUDA torch's header: only the declarations mlifast's glue uses.
#pragma once
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device);
};
}  // namespace c10::cuda
