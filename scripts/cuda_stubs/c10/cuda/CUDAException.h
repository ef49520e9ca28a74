// Stand-in for a CUDA torch's header: only the declarations mlifast's glue uses.
#pragma once
#include <cuda_runtime.h>
#define C10_CUDA_CHECK(expr) static_cast<void>(static_cast<cudaError_t>(expr))
