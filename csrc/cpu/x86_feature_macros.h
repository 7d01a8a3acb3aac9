// The feature macros that sleef.h and at::vec test, set to match a `#pragma GCC target` of
// epilogue_avx2.cpp / epilogue_avx512.cpp (a pragma enables the instructions but not the macros).
// AVX2 + FMA always; AVX-512 F/BW/VL/DQ too when MMLOSS_X86_AVX512 is defined. Include after
// the pragma, before any ATen header.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifdef MMLOSS_X86_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
