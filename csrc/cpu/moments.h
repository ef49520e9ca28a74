// Moments of a set of values in float64 (count, mean and sum of squared deviations M2),
// merged set by set: the CPU kernels that gather a batch norm's statistics.
#pragma once

namespace mlifast {

// Adds the set (nb, mean_b, m2_b) to (n, mean, m2) by Chan, Golub and LeVeque's formula,
// exact in exact arithmetic.
inline __attribute__((always_inline)) void merge_moments(double& n, double& mean, double& m2, double nb,
                                                         double mean_b, double m2_b) {
  if (nb == 0) return;
  const double total = n + nb, delta = mean_b - mean, share = nb / total;
  mean += delta * share;
  m2 += m2_b + delta * (delta * (n * share));  // (in this order: no inf · 0 while n = 0)
  n = total;
}

}  // namespace mlifast
