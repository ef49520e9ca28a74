// winograd_tasks.h's steps for AVX2 (32-byte vectors).
#include "winograd_tasks.h"

namespace mlifast {
namespace winograd_tasks {

__attribute__((target("avx2,fma"))) void weight_32(const Job& j, int64_t begin, int64_t end) {
  transform_weight_task<32>(j, begin, end);
}

__attribute__((target("avx2,fma"))) void blocks_32(const Job& j, winograd::Prologue p, bool relu, int64_t begin, int64_t end) {
  blocks_task<32>(j, p, relu, begin, end);
}

}  // namespace winograd_tasks
}  // namespace mlifast
