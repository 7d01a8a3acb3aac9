// The CPU epilogues for AVX2 + FMA (picked at run time when the CPU has both; see ops.cpp).
// The whole translation unit is compiled for AVX2 through the target pragma, so the build needs
// no per-file flags; the feature macros that sleef.h and at::vec test are set to match. Only
// at::vec (inline namespace AVX2) and the tile math are included: no inline function of another
// namespace is emitted for AVX2 under a name the default code also uses.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "x86_feature_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define MMLOSS_ISA avx2
#include "epilogue_impl.h"
#pragma GCC pop_options
#endif
