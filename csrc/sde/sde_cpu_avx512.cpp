// The sde CPU kernels for the avx512 tier; CMakeLists.txt sets this file's instruction-set flags.
#define DEEPKERN_CPU_TIER avx512
#include "sde/sde_cpu_tiles.h"
