// The Python module mmloss._C: importing it loads this library, whose static initialisers
// register the mmloss_C ops (register.cpp). Its one function reports how it was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/api/include/torch/version.h>

#include "cpu/ops.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace {

const char* compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc";
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["compiler"] = compiler();
  d["torch"] = TORCH_VERSION;
#ifdef MMLOSS_WITH_CUDA
  d["cuda"] = true;
  d["cuda_sources"] = MMLOSS_CUDA_SOURCES;  // sha256 the GPU self-check record is keyed on
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;  // at::parallel_for really runs the epilogue passes in parallel
#else
  d["openmp"] = false;
#endif
  d["cpu_isa"] = mmloss::cpu::epilogue_isa();
  d["cpu_isas_built"] = mmloss::cpu::epilogue_isas_built();
#ifdef MMLOSS_BUILD_FLAGS
  d["flags"] = MMLOSS_BUILD_FLAGS;
#endif
  d["op_namespace"] = "mmloss_C";
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmloss compiled backends (ops registered as torch.ops.mmloss_C.*)";
  m.def("build_info", &build_info,
        "dict: compiler, torch version built against, cuda (CUDA part built), cpu_isa (epilogue instruction set "
        "in use), cpu_isas_built");
  m.def("logit_blocks", &mmloss::cpu::logit_blocks, pybind11::arg("n"), pybind11::arg("m"), pybind11::arg("d"),
        pybind11::arg("elem"), pybind11::arg("chunk_size") = 0,
        "(rows, columns) of the blocks the cpu backend's similarity_lse / pairwise_sigmoid passes cut an n x m "
        "logit matrix into (d features of elem bytes; MMLOSS_CHUNK_BYTES and chunk_size apply)");
}
