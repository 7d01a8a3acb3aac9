// Host-only check, run by scripts/compile_cuda.sh: every CUDA kernel of the mmloss_C ops
// (csrc/cuda/ops_cuda.h) has the C++ signature its schema (csrc/include/mmloss/schema.h)
// requires. The dispatcher makes exactly this comparison (c10::findSchemaDifferences) when
// TORCH_LIBRARY_IMPL(mmloss_C, CUDA, m) registers them, which without this check would first
// happen when `import mmloss._C` runs on a GPU machine. Links against the CPU torch only.
// Exit status: 0 when all match, 1 otherwise (each mismatch printed).
#include <ATen/core/op_registration/infer_schema.h>
#include <torch/csrc/jit/frontend/function_schema_parser.h>

#include <iostream>
#include <string>

#include "../../csrc/cuda/ops_cuda.h"
#include "mmloss/schema.h"

namespace {

int failures = 0;

template <typename Fn>
void expect(const char* name, const char* schema) {
  const c10::FunctionSchema specified = torch::jit::parseSchema(std::string("mmloss_C::") + schema);
  const c10::FunctionSchema inferred = c10::inferFunctionSchemaFlattenedReturns<Fn>();
  if (specified.name() != std::string("mmloss_C::") + name) {
    std::cerr << name << ": schema.h names the op " << specified.name() << "\n";
    ++failures;
    return;
  }
  if (const auto diff = c10::findSchemaDifferences(inferred, specified)) {
    std::cerr << name << ": the CUDA kernel's signature does not match its schema: " << *diff
              << "\n  inferred:  " << inferred << "\n  specified: " << specified << "\n";
    ++failures;
    return;
  }
  std::cout << "ok  " << name << "\n";
}

}  // namespace

int main() {
  namespace s = mmloss::schema;
  namespace k = mmloss::cuda;
  expect<decltype(k::similarity_lse)>("similarity_lse", s::similarity_lse);
  expect<decltype(k::similarity_lse_backward)>("similarity_lse_backward", s::similarity_lse_backward);
  expect<decltype(k::pairwise_sigmoid)>("pairwise_sigmoid", s::pairwise_sigmoid);
  expect<decltype(k::pairwise_sigmoid_backward)>("pairwise_sigmoid_backward", s::pairwise_sigmoid_backward);
  expect<decltype(k::pairwise_sigmoid_sum)>("pairwise_sigmoid_sum", s::pairwise_sigmoid_sum);
  expect<decltype(k::similarity_kl)>("similarity_kl", s::similarity_kl);
  expect<decltype(k::similarity_kl_backward)>("similarity_kl_backward", s::similarity_kl_backward);
  const int ops = static_cast<int>(sizeof(s::ALL) / sizeof(s::ALL[0]));
  if (ops != 7) {
    std::cerr << "schema.h declares " << ops << " ops; csrc/cuda implements 7: add the new ones\n";
    ++failures;
  }
  return failures == 0 ? 0 : 1;
}
