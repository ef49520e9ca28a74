// Scratch memory a CPU kernel keeps between calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/accumulate.h>

namespace mlifast {

// A tensor of `sizes` from `kept` (the caller's thread_local), which grows to fit and is
// kept up to `max_bytes`; larger requests get a tensor of their own. Fresh memory is
// mapped anew by glibc on every call, and the page faults of touching it cost about as
// much as the work done in it (a 1024² float32 weight formed: 1.3 against 0.3 ms; W5's
// ReLU-line scratch likewise). Not initialised.
inline at::Tensor kept_scratch(at::Tensor& kept, at::IntArrayRef sizes, const at::TensorOptions& options,
                               int64_t max_bytes) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (numel * int64_t(options.dtype().itemsize()) > max_bytes) return at::empty(sizes, options);
  if (!kept.defined() || kept.numel() < numel || kept.dtype() != options.dtype() ||
      kept.device() != options.device()) {
    c10::InferenceMode normal(false);  // a normal tensor: written in place in and outside inference mode
    kept = at::empty({numel}, options);
  }
  return kept.narrow(0, 0, numel).view(sizes);
}

}  // namespace mlifast
