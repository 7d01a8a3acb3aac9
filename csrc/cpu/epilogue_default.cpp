// The CPU epilogues for any x86-64/ARM CPU: at::vec's portable lanes (compiler-vectorised).
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#endif
#define MMLOSS_ISA default
#include "epilogue_impl.h"
