// The CPU epilogues for AVX-512 (F, BW, VL, DQ; picked at run time when the CPU has them and
// torch's own kernels use AVX-512 too; see ops.cpp). Same scheme as epilogue_avx2.cpp: the
// translation unit is compiled for the ISA through the target pragma, the feature macros are
// set to match, and only at::vec (inline namespace AVX512) and the tile math are included.
// 16 fp32 lanes: half the exp instructions of AVX2.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// GCC 12 flags its own avx512fintrin.h masked-load helpers (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MMLOSS_X86_AVX512 1
#include "x86_feature_macros.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define MMLOSS_ISA avx512
#include "epilogue_impl.h"
#pragma GCC pop_options
#endif
