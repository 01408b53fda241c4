// linear.cu - the prompt-path matrix product: dequantize to fp16, cublasGemmEx.
#include <string>

#include "cuda_common.cuh"
#include "ggml_types.h"
#include "kernels.cuh"

namespace orcd {
namespace cu {

void gemm_linear(cublasHandle_t blas, cudaStream_t st, uint32_t type, const uint8_t* w, size_t row_bytes, int n_in,
                 int n_out, const float* x, int rows, float* y, int ldy, const float* bias, bool accumulate,
                 __half* act16, __half* w16, size_t w16_elems, const char* what) {
    if (rows <= 0 || n_out <= 0) return;
    const std::string who = what ? what : "?";
    f32_to_f16(x, int64_t(rows) * n_in, act16, st, what);

    const bool in_place = type == T_F16;  // fp16 rows can be fed to cuBLAS as they are
    int64_t chunk = in_place ? n_out : int64_t(w16_elems / size_t(n_in));
    if (chunk < 1) throw Error("gemm_linear: fp16 scratch of " + std::to_string(w16_elems) +
                               " elements cannot hold one row of " + who);
    if (!in_place) {
        // Rows per chunk a multiple of the type's block count per row is automatic:
        // whole rows always start at a block boundary.
        if (chunk > n_out) chunk = n_out;
    }
    const float one = 1.0f, zero = 0.0f;
    for (int64_t r0 = 0; r0 < n_out; r0 += chunk) {
        const int nr = int(r0 + chunk <= n_out ? chunk : n_out - r0);
        const uint8_t* wr = w + size_t(r0) * row_bytes;
        const __half* A;
        if (in_place) {
            A = reinterpret_cast<const __half*>(wr);
        } else {
            dequantize_f16(type, wr, int64_t(nr) * n_in, w16, st, what);
            A = w16;
        }
        // cuBLAS is column-major. In its terms:
        //   A = the fp16 rows of W[r0 .. r0+nr) (row-major nr x n_in) is an
        //       n_in x nr matrix with lda = n_in;
        //   B = x (row-major rows x n_in) is an n_in x rows matrix, ldb = n_in;
        //   C = y (row-major rows x ldy) is an ldy x rows matrix, ldc = ldy; we
        //       write its rows r0 .. r0+nr, i.e. start at y + r0.
        // C[r][t] = sum_k A[k][r] * B[k][t]  =>  C = op(A)·B with op(A) = Aᵀ
        // (CUBLAS_OP_T: m = nr, k = n_in), op(B) = B (CUBLAS_OP_N: n = rows).
        CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, nr, rows, n_in, &one, A, CUDA_R_16F, n_in,
                                  act16, CUDA_R_16F, n_in, accumulate ? &one : &zero, y + r0, CUDA_R_32F, ldy,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx for " + who);
    }
    if (bias) add_bias(y, rows, n_out, ldy, bias, st, what);
}

void gemm_f16(cublasHandle_t blas, const __half* a16, int n_in, int n_out, const __half* x16, int rows, float* y,
              int ldy, bool accumulate, const char* what) {
    if (rows <= 0 || n_out <= 0) return;
    const float one = 1.0f, zero = 0.0f;
    // Column-major view as in gemm_linear: C (ldy x rows) = Aᵀ (n_out x n_in) · B (n_in x rows).
    CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, rows, n_in, &one, a16, CUDA_R_16F, n_in, x16,
                              CUDA_R_16F, n_in, accumulate ? &one : &zero, y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT),
                 std::string("cublasGemmEx for ") + (what ? what : "?"));
}

}  // namespace cu
}  // namespace orcd
