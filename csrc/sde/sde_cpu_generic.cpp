// The sde CPU kernels for the generic tier; CMakeLists.txt sets this file's instruction-set flags.
#define DEEPKERN_CPU_TIER generic
#include "sde/sde_cpu_tiles.h"
