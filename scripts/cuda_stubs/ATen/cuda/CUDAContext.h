// Stand-in for a CUDA torch's header: only the declarations mlifast's glue uses.
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime.h>
namespace at::cuda {
struct CUDAStream {
  cudaStream_t stream() const;
};
CUDAStream getCurrentCUDAStream(c10::DeviceIndex device = -1);
cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device);
}  // namespace at::cuda
