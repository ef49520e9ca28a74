// winograd_tasks.h's steps for the baseline instruction set (16-byte vectors).
#include "winograd_tasks.h"

namespace mlifast {
namespace winograd_tasks {

void weight_16(const Job& j, int64_t begin, int64_t end) {
  transform_weight_task<16>(j, begin, end);
}

void blocks_16(const Job& j, winograd::Prologue p, bool relu, int64_t begin, int64_t end) {
  blocks_task<16>(j, p, relu, begin, end);
}

}  // namespace winograd_tasks
}  // namespace mlifast
