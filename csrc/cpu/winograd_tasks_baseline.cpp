// winograd_tasks.h's steps for the baseline instruction set (16-byte vectors).
#include "winograd_tasks.h"

MLIFAST_WINOGRAD_TASKS(16)
