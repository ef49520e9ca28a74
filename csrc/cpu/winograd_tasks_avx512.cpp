// winograd_tasks.h's steps for AVX-512 (64-byte vectors).
#include "winograd_tasks.h"

MLIFAST_WINOGRAD_TASKS(64, __attribute__((target("avx512f,avx2,fma"))))
