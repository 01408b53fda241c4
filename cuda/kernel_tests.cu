// kernel_tests.cu - one-kernel entry points on host data, for
// tests/test_cuda_kernels.py: upload the inputs, poison the output with NaN,
// run the same launcher the engine uses, download.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "decode.cuh"
#include "ggml_types.h"
#include "kernels.cuh"

namespace orcd {
namespace cuda_test {
namespace {

// A device buffer freed on scope exit.
template <class T>
struct DBuf {
    T* p = nullptr;
    size_t n = 0;
    explicit DBuf(size_t count, const char* what) : n(count) {
        if (n) CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), n * sizeof(T)), what);
    }
    DBuf(const T* host, size_t count, const char* what) : DBuf(count, what) {
        if (n) CUDA_CHECK(cudaMemcpy(p, host, n * sizeof(T), cudaMemcpyHostToDevice), what);
    }
    ~DBuf() {
        if (p) cudaFree(p);
    }
    DBuf(const DBuf&) = delete;
    DBuf& operator=(const DBuf&) = delete;
    std::vector<T> download(const char* what) const {
        std::vector<T> h(n);
        CUDA_CHECK(cudaDeviceSynchronize(), what);
        if (n) CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), what);
        return h;
    }
};

void ready() {
    const std::string st = cuda_status();
    if (!st.empty()) throw CudaError("CUDA backend unavailable: " + st);
    CUDA_CHECK(cudaSetDevice(0), "cuda_test");
}

size_t bytes_for(uint32_t type, int64_t n, const char* what) {
    const TypeInfo* ti = type_info(type);
    if (!ti || !cu::type_supported(type))
        throw Error(std::string(what) + ": unsupported type id " + std::to_string(type));
    if (n < 0 || n % ti->block_size != 0)
        throw Error(std::string(what) + ": " + std::to_string(n) + " elements is not a multiple of the " + ti->name +
                    " block size " + std::to_string(ti->block_size));
    return size_t(n / ti->block_size) * size_t(ti->block_bytes);
}

void check_bytes(size_t have, size_t need, const char* what) {
    if (have < need)
        throw Error(std::string(what) + ": " + std::to_string(have) + " bytes given, " + std::to_string(need) +
                    " needed");
}

struct Blas {
    cublasHandle_t h = nullptr;
    Blas() { CUBLAS_CHECK(cublasCreate(&h), "cuda_test gemm"); }
    ~Blas() {
        if (h) cublasDestroy(h);
    }
};

}  // namespace

std::vector<uint16_t> dequantize_f16(uint32_t type, const uint8_t* data, size_t nbytes, int64_t n) {
    ready();
    const size_t need = bytes_for(type, n, "dequantize_f16");
    check_bytes(nbytes, need, "dequantize_f16");
    DBuf<uint8_t> src(data, need, "dequantize_f16 input");
    DBuf<__half> dst(size_t(n), "dequantize_f16 output");
    cu::fill_nan(dst.p, n, 0);
    cu::dequantize_f16(type, src.p, n, dst.p, 0, "dequantize_f16 test");
    std::vector<__half> h = dst.download("dequantize_f16 output");
    std::vector<uint16_t> out(h.size());
    for (size_t i = 0; i < h.size(); ++i) out[i] = __half_as_ushort(h[i]);
    return out;
}

static std::vector<float> product(bool use_gemm, uint32_t type, const uint8_t* w, size_t nbytes, int64_t n_in,
                                  int64_t n_out, const float* x, int m, const float* bias, const float* y_init,
                                  int64_t chunk_rows) {
    ready();
    const char* what = use_gemm ? "gemm test" : "matvec test";
    if (n_in <= 0 || n_out <= 0 || m <= 0) throw Error(std::string(what) + ": empty shape");
    const size_t row_bytes = bytes_for(type, n_in, what);
    check_bytes(nbytes, row_bytes * size_t(n_out), what);
    DBuf<uint8_t> dw(w, row_bytes * size_t(n_out), what);
    DBuf<float> dx(x, size_t(m) * n_in, what);
    DBuf<float> dy(size_t(m) * n_out, what);
    if (y_init) CUDA_CHECK(cudaMemcpy(dy.p, y_init, dy.n * sizeof(float), cudaMemcpyHostToDevice), what);
    else cu::fill_nan(dy.p, int64_t(dy.n), 0);
    DBuf<float> db(bias, bias ? size_t(n_out) : 0, what);
    if (!use_gemm) {
        cu::matvec(type, dw.p, row_bytes, int(n_in), int(n_out), dx.p, int(n_in), m, dy.p, int(n_out), db.p,
                   y_init != nullptr, 0, what);
    } else {
        Blas blas;
        const int64_t rows = chunk_rows > 0 ? std::min(chunk_rows, n_out) : n_out;
        DBuf<__half> act(size_t(m) * n_in, what);
        DBuf<__half> w16(size_t(rows) * n_in, what);
        cu::fill_nan(act.p, int64_t(act.n), 0);
        cu::fill_nan(w16.p, int64_t(w16.n), 0);
        cu::gemm_linear(blas.h, 0, type, dw.p, row_bytes, int(n_in), int(n_out), dx.p, m, dy.p, int(n_out), db.p,
                        y_init != nullptr, act.p, w16.p, w16.n, what);
    }
    return dy.download(what);
}

std::vector<float> matvec(uint32_t type, const uint8_t* w, size_t nbytes, int64_t n_in, int64_t n_out,
                          const float* x, int m, const float* bias, const float* y_init) {
    return product(false, type, w, nbytes, n_in, n_out, x, m, bias, y_init, 0);
}

std::vector<float> gemm(uint32_t type, const uint8_t* w, size_t nbytes, int64_t n_in, int64_t n_out, const float* x,
                        int m, const float* bias, const float* y_init, int64_t chunk_rows) {
    return product(true, type, w, nbytes, n_in, n_out, x, m, bias, y_init, chunk_rows);
}

std::vector<float> dec_matvec(uint32_t type, const uint8_t* w, size_t nbytes, int64_t n_in, int64_t n_out,
                              const float* x, const float* norm_w, float eps, int32_t* argmax) {
    ready();
    const char* what = "dec_matvec test";
    if (n_in <= 0 || n_out <= 0 || n_in % 32 != 0) throw Error("dec_matvec test: n_in must be a positive multiple of 32");
    const size_t row_bytes = bytes_for(type, n_in, what);
    check_bytes(nbytes, row_bytes * size_t(n_out), what);
    // the kernel's 16-byte staging may read up to 15 bytes past the last row: pad like the engine does
    const size_t need = row_bytes * size_t(n_out);
    if (need > (size_t(1) << 34)) throw Error("dec_matvec test: weights too large");
    std::vector<uint8_t> padded(need + 256, 0);
    std::memcpy(padded.data(), w, need);
    DBuf<uint8_t> dw(padded.data(), padded.size(), what);
    DBuf<float> dx(x, size_t(n_in), what);
    DBuf<float> dn(norm_w, norm_w ? size_t(n_in) : 0, what);
    DBuf<float> dy(size_t(n_out), what);
    cu::fill_nan(dy.p, int64_t(dy.n), 0);
    cu::DecProjArgs a{};
    a.w[0] = cu::DTensor{dw.p, type, int(n_in), int(n_out), int(row_bytes)};
    a.n_tensors = 1;
    // the engine's lm_head plan (cu::dec_lm_plan within 64 KB), on a small persistent
    // grid of 7 blocks (56 warps) so each warp takes several batches and, past 448 rows
    // (2-row batches), its buffer ring wraps
    cu::dec_lm_plan(row_bytes, size_t(64) << 10, &a.rows_per_block, &a.lm_stages, &a.smem_w);
    if (a.rows_per_block == 0) throw Error("dec_matvec test: a row is too long for the lm_head stage");
    a.lm_grid = 7;
    const size_t smem = cu::dec_proj_smem(a.smem_w, int(n_in));
    int optin = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), what);
    if (smem > size_t(optin)) throw Error("dec_matvec test: a row is too long for the shared-memory stage");
    cu::dec_set_smem_limit(std::max(smem, size_t(48) << 10));
    const int blocks = std::min(cu::dec_proj_blocks(a), a.lm_grid);
    DBuf<cu::ArgPart> parts(size_t(blocks), what);
    DBuf<cu::DecState> st(1, what);
    DBuf<cu::DecSync> sync(1, what);
    CUDA_CHECK(cudaMemset(st.p, 0xff, sizeof(cu::DecState)), what);
    CUDA_CHECK(cudaMemset(sync.p, 0, sizeof(cu::DecSync)), what);
    a.act = dx.p;
    a.norm_w = dn.p;
    a.eps = eps;
    a.need_q8 = cu::dec_int8_type(type);
    a.mode = cu::DEC_LOGITS;
    a.y = dy.p;
    a.argmax = 1;
    a.part = parts.p;
    a.counter = &sync.p->lm;
    a.st = st.p;
    cu::dec_proj(a, 0, false, what);
    std::vector<cu::DecState> hs = st.download(what);
    if (argmax) *argmax = hs[0].token;
    return dy.download(what);
}

std::vector<float> get_rows(uint32_t type, const uint8_t* w, size_t nbytes, int64_t n_in, int64_t n_rows,
                            const int32_t* ids, int n_ids) {
    ready();
    const size_t row_bytes = bytes_for(type, n_in, "get_rows");
    check_bytes(nbytes, row_bytes * size_t(n_rows), "get_rows");
    for (int i = 0; i < n_ids; ++i)
        if (ids[i] < 0 || ids[i] >= n_rows)
            throw Error("get_rows: id " + std::to_string(ids[i]) + " out of range [0, " + std::to_string(n_rows) + ")");
    DBuf<uint8_t> dw(w, row_bytes * size_t(n_rows), "get_rows weights");
    DBuf<int32_t> di(ids, size_t(n_ids), "get_rows ids");
    DBuf<float> out(size_t(n_ids) * n_in, "get_rows output");
    cu::fill_nan(out.p, int64_t(out.n), 0);
    cu::get_rows(type, dw.p, row_bytes, int(n_in), di.p, n_ids, out.p, 0, "get_rows test");
    return out.download("get_rows output");
}

std::vector<float> rmsnorm(const float* x, int64_t rows, int64_t n, const float* w, float eps) {
    ready();
    DBuf<float> dx(x, size_t(rows * n), "rmsnorm x");
    DBuf<float> dw(w, size_t(n), "rmsnorm w");
    DBuf<float> dy(size_t(rows * n), "rmsnorm y");
    cu::fill_nan(dy.p, int64_t(dy.n), 0);
    cu::rmsnorm(dx.p, int(rows), int(n), dw.p, eps, dy.p, 0, "rmsnorm test");
    return dy.download("rmsnorm y");
}

std::vector<float> rope(const float* x, int n_tok, int n_heads, int head_dim, const int32_t* pos, float base) {
    ready();
    const size_t n = size_t(n_tok) * n_heads * head_dim;
    DBuf<float> dx(x, n, "rope x");
    DBuf<int32_t> dp(pos, size_t(n_tok), "rope pos");
    cu::rope_neox(dx.p, n_heads * head_dim, n_tok, n_heads, head_dim, dp.p, base, 0, "rope test");
    return dx.download("rope x");
}

std::vector<float> attention(const float* q, int n_q, int n_head, const float* k, const float* v, int n_kv,
                             int n_head_kv, int head_dim, const int32_t* pos, int split_len) {
    ready();
    if (n_q <= 0 || n_kv <= 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv != 0)
        throw Error("attention test: bad shape");
    int kv_max = 0;
    for (int i = 0; i < n_q; ++i) {
        if (pos[i] < 0 || pos[i] >= n_kv)
            throw Error("attention test: pos " + std::to_string(pos[i]) + " outside the " + std::to_string(n_kv) +
                        " cached positions");
        kv_max = std::max(kv_max, pos[i] + 1);
    }
    const int kv_dim = n_head_kv * head_dim, q_dim = n_head * head_dim;
    DBuf<float> dq(q, size_t(n_q) * q_dim, "attention q");
    DBuf<float> dk(k, size_t(n_kv) * kv_dim, "attention k");
    DBuf<float> dv(v, size_t(n_kv) * kv_dim, "attention v");
    // One slot of n_kv positions, poisoned, then filled by the KV-store kernel
    // (token t at position t), as the engine appends a prompt.
    DBuf<__half> kc(size_t(n_kv) * kv_dim, "attention k cache"), vc(size_t(n_kv) * kv_dim, "attention v cache");
    cu::fill_nan(kc.p, int64_t(kc.n), 0);
    cu::fill_nan(vc.p, int64_t(vc.n), 0);
    std::vector<int32_t> kv_pos(n_kv), zeros(std::max(n_kv, n_q), 0);
    for (int i = 0; i < n_kv; ++i) kv_pos[i] = i;
    DBuf<int32_t> dkp(kv_pos.data(), kv_pos.size(), "attention kv pos");
    DBuf<int32_t> dslot(zeros.data(), zeros.size(), "attention slots");
    DBuf<int32_t> dpos(pos, size_t(n_q), "attention pos");
    const size_t slot_stride = size_t(n_kv) * kv_dim;
    cu::kv_store(dk.p, dv.p, kv_dim, n_kv, kv_dim, dslot.p, dkp.p, kc.p, vc.p, slot_stride, 0, "attention test");

    int sms = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "attention test");
    const cu::AttnPlan plan =
        split_len > 0 ? cu::attn_plan_fixed(kv_max, split_len) : cu::attn_plan(n_q, kv_max, n_head, sms);
    const size_t np = cu::attn_partials(n_q, n_head, plan);
    DBuf<float> part_o(np * head_dim, "attention partials");
    DBuf<float2> part_ml(np, "attention partials");
    DBuf<float> out(size_t(n_q) * q_dim, "attention out");
    cu::fill_nan(part_o.p, int64_t(part_o.n), 0);
    cu::fill_nan(out.p, int64_t(out.n), 0);
    cu::attention(dq.p, q_dim, kc.p, vc.p, slot_stride, kv_dim, dslot.p, dpos.p, n_q, n_head, n_head_kv, head_dim,
                  plan, part_o.p, part_ml.p, out.p, q_dim, 0, "attention test");
    return out.download("attention out");
}

std::vector<float> swiglu(const float* g, const float* u, int64_t n) {
    ready();
    DBuf<float> dg(g, size_t(n), "swiglu g"), du(u, size_t(n), "swiglu u");
    cu::swiglu(dg.p, du.p, n, 0, "swiglu test");
    return dg.download("swiglu out");
}

std::vector<float> add_bias(const float* x, int64_t rows, int64_t n, const float* b) {
    ready();
    DBuf<float> dx(x, size_t(rows * n), "add_bias x"), db(b, size_t(n), "add_bias b");
    cu::add_bias(dx.p, int(rows), int(n), int(n), db.p, 0, "add_bias test");
    return dx.download("add_bias out");
}

}  // namespace cuda_test
}  // namespace orcd
