// winograd_tasks.h's steps for AVX-512 (64-byte vectors).
#include "winograd_tasks.h"

namespace mlifast {
namespace winograd_tasks {

__attribute__((target("avx512f,avx2,fma"))) void weight_64(const Job& j, int64_t begin, int64_t end) {
  transform_weight_task<64>(j, begin, end);
}

__attribute__((target("avx512f,avx2,fma"))) void blocks_64(const Job& j, winograd::Prologue p, bool relu, int64_t begin, int64_t end) {
  blocks_task<64>(j, p, relu, begin, end);
}

}  // namespace winograd_tasks
}  // namespace mlifast
