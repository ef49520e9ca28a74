// winograd_tasks.h's steps for AVX2 (32-byte vectors).
#include "winograd_tasks.h"

MLIFAST_WINOGRAD_TASKS(32, __attribute__((target("avx2,fma"))))
