// An XLA FFI handler computing y = x @ w (float32, row-major, no transposes) with a CBLAS
// sgemm whose address the host sets at run time (`jaxgpt_set_sgemm`), so the library needs no
// link-time dependency on a particular BLAS build. x: (..., K) with the leading axes folded
// into M rows, w: (K, N), y: (..., N). Used by benchmarks/tools/ffi_gemm.py only.
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// cblas_sgemm with 64-bit integers (an ILP64 OpenBLAS such as numpy's bundled one).
using Sgemm = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                       float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                       float beta, float* c, int64_t ldc);
static Sgemm sgemm = nullptr;

extern "C" void jaxgpt_set_sgemm(void* address) { sgemm = reinterpret_cast<Sgemm>(address); }

static ffi::Error MatMul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> y) {
  if (sgemm == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "jaxgpt_set_sgemm was not called");
  }
  auto dims = w.dimensions();
  if (dims.size() != 2 || dims[0] == 0 || x.element_count() % dims[0] != 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "w must be (K, N) and x (..., K)");
  }
  const int64_t k = dims[0], n = dims[1], m = x.element_count() / k;
  constexpr int kRowMajor = 101, kNoTrans = 111;  // CBLAS enum values
  sgemm(kRowMajor, kNoTrans, kNoTrans, m, n, k, 1.0f, x.typed_data(), k, w.typed_data(), n, 0.0f,
        y->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgptMatMul, MatMul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
