// kernel_tests.cu - one-kernel entry points on host data, for
// tests/test_cuda_kernels.py: upload the inputs, poison the output with NaN,
// run the same launcher the engine uses, download.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cuda_common.cuh"
#include "decode.cuh"
#include "family_kernels.cuh"
#include "sample.cuh"
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

// The kernels' slot table for caches laid out [slot][pos][kv_dim]: slot s starts s*stride in.
std::vector<int64_t> slot_offsets(int n_slots, size_t stride) {
    std::vector<int64_t> off(static_cast<size_t>(n_slots), 0);
    for (int s = 0; s < n_slots; ++s) off[size_t(s)] = int64_t(s) * int64_t(stride);
    return off;
}

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
                              const float* x, const float* norm_w, float eps, int32_t* argmax, bool bulk) {
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
    a.lm_bulk = bulk ? 1 : 0;
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

std::vector<float> rmsnorm_rows(const float* x, int64_t rows, int64_t n, const float* w, float eps) {
    ready();
    DBuf<float> dx(x, size_t(rows * n), "rmsnorm_rows x");
    DBuf<float> dw(w, size_t(n), "rmsnorm_rows w");
    cu::rmsnorm_rows(dx.p, int(rows), int(n), dw.p, eps, 0, "rmsnorm_rows test");
    return dx.download("rmsnorm_rows x");
}

std::vector<float> geglu_tanh(const float* g, const float* u, int64_t n) {
    ready();
    DBuf<float> dg(g, size_t(n), "geglu_tanh g"), du(u, size_t(n), "geglu_tanh u");
    cu::geglu_tanh(dg.p, du.p, n, 0, "geglu_tanh test");
    return dg.download("geglu_tanh out");
}

std::vector<float> rope_neox(const float* x, int n_tok, int n_heads, int head_dim, const int32_t* pos, float base) {
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
    const std::vector<int64_t> offs = slot_offsets(1, size_t(n_kv) * kv_dim);
    DBuf<int64_t> doff(offs.data(), offs.size(), "attention slot table");
    cu::kv_store(dk.p, dv.p, kv_dim, n_kv, kv_dim, dslot.p, dkp.p, kc.p, vc.p, doff.p, 0, "attention test");

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
    cu::attention(dq.p, q_dim, kc.p, vc.p, doff.p, kv_dim, dslot.p, dpos.p, n_q, n_head, n_head_kv, head_dim,
                  plan, part_o.p, part_ml.p, out.p, q_dim, 0, "attention test");
    return out.download("attention out");
}

std::vector<float> swiglu_oai(const float* g, const float* u, int64_t n, float alpha, float limit) {
    ready();
    DBuf<float> dg(g, size_t(n), "swiglu_oai g"), du(u, size_t(n), "swiglu_oai u");
    cu::swiglu_oai(dg.p, du.p, n, alpha, limit, 0, "swiglu_oai test");
    return dg.download("swiglu_oai out");
}

std::vector<float> rope_freqs(const float* x, int n_tok, int n_heads, int head_dim, const int32_t* pos,
                              const double* inv_freq, float mscale, bool neox) {
    ready();
    if (n_tok <= 0 || n_heads <= 0 || head_dim < 2 || head_dim % 2) throw Error("rope_freqs test: bad shape");
    const size_t n = size_t(n_tok) * n_heads * head_dim;
    DBuf<float> dx(x, n, "rope_freqs x");
    DBuf<int32_t> dpos(pos, size_t(n_tok), "rope_freqs pos");
    DBuf<double> df(inv_freq, size_t(head_dim / 2), "rope_freqs inv_freq");
    cu::rope_freqs(dx.p, n_heads * head_dim, n_tok, n_heads, head_dim, dpos.p, df.p, mscale, neox, 0, "rope_freqs test");
    return dx.download("rope_freqs out");
}

std::vector<float> attention_sinks(const float* q, int n_q, int n_head, const float* k, const float* v, int n_kv,
                                   int n_head_kv, int head_dim, const int32_t* pos, int window, const float* sinks) {
    ready();
    if (n_q <= 0 || n_kv <= 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv != 0)
        throw Error("attention_sinks test: bad shape");
    for (int i = 0; i < n_q; ++i)
        if (pos[i] < 0 || pos[i] >= n_kv)
            throw Error("attention_sinks test: pos " + std::to_string(pos[i]) + " outside the " +
                        std::to_string(n_kv) + " cached positions");
    const int kv_dim = n_head_kv * head_dim, q_dim = n_head * head_dim;
    const size_t slot_stride = size_t(n_kv) * kv_dim;
    // the keys in slot 1 of 3, the others NaN: a read outside the slot's positions shows
    const std::vector<int64_t> offs = {int64_t(slot_stride), int64_t(2 * slot_stride), 0};
    DBuf<float> dq(q, size_t(n_q) * q_dim, "attention_sinks q");
    DBuf<float> dk(k, size_t(n_kv) * kv_dim, "attention_sinks k"), dv(v, size_t(n_kv) * kv_dim, "attention_sinks v");
    DBuf<__half> kc(3 * slot_stride, "attention_sinks k cache"), vc(3 * slot_stride, "attention_sinks v cache");
    cu::fill_nan(kc.p, int64_t(kc.n), 0);
    cu::fill_nan(vc.p, int64_t(vc.n), 0);
    std::vector<int32_t> kv_pos(n_kv), ones(size_t(std::max(n_kv, n_q)), 1);
    for (int i = 0; i < n_kv; ++i) kv_pos[i] = i;
    DBuf<int32_t> dkp(kv_pos.data(), kv_pos.size(), "attention_sinks kv pos");
    DBuf<int32_t> dslot(ones.data(), ones.size(), "attention_sinks slots");
    DBuf<int32_t> dpos(pos, size_t(n_q), "attention_sinks pos");
    DBuf<int64_t> doff(offs.data(), offs.size(), "attention_sinks slot table");
    cu::kv_store(dk.p, dv.p, kv_dim, n_kv, kv_dim, dslot.p, dkp.p, kc.p, vc.p, doff.p, 0, "attention_sinks test");
    std::unique_ptr<DBuf<float>> dsinks;
    if (sinks) dsinks = std::make_unique<DBuf<float>>(sinks, size_t(n_head), "attention_sinks sinks");
    DBuf<float> out(size_t(n_q) * q_dim, "attention_sinks out");
    cu::fill_nan(out.p, int64_t(out.n), 0);
    cu::attention_sinks(dq.p, q_dim, kc.p, vc.p, doff.p, kv_dim, dslot.p, dpos.p, n_q, n_head, n_head_kv, head_dim,
                        window, dsinks ? dsinks->p : nullptr, out.p, q_dim, 0, "attention_sinks test");
    return out.download("attention_sinks out");
}

std::vector<float> flash_attention(const float* q, int n_q, int n_head, const float* k, const float* v, int n_kv,
                                   int n_head_kv, int head_dim, const int32_t* pos, bool routed, int split_len) {
    ready();
    if (n_q <= 0 || n_kv <= 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv != 0)
        throw Error("flash_attention test: bad shape");
    if (!routed && (!cu::flash_supported(head_dim) || split_len < 0 || split_len % 64 != 0))
        throw Error("flash_attention test: head_dim must be 64 or 128 and split_len a multiple of 64");
    int kv_max = 0;
    for (int i = 0; i < n_q; ++i) {
        if (pos[i] < 0 || pos[i] >= n_kv)
            throw Error("flash_attention test: pos " + std::to_string(pos[i]) + " outside the " +
                        std::to_string(n_kv) + " cached positions");
        kv_max = std::max(kv_max, pos[i] + 1);
    }
    const int kv_dim = n_head_kv * head_dim, q_dim = n_head * head_dim;
    const size_t slot_stride = size_t(n_kv) * kv_dim;
    // three slots out of order in the cache (slot 1, the one used, last): the kernels follow the table
    const std::vector<int64_t> offs = {int64_t(slot_stride), int64_t(2 * slot_stride), 0};
    DBuf<int64_t> doff(offs.data(), offs.size(), "flash slot table");
    DBuf<float> dq(q, size_t(n_q) * q_dim, "flash q");
    DBuf<float> dk(k, size_t(n_kv) * kv_dim, "flash k");
    DBuf<float> dv(v, size_t(n_kv) * kv_dim, "flash v");
    DBuf<__half> kc(3 * slot_stride, "flash k cache"), vc(3 * slot_stride, "flash v cache");
    cu::fill_nan(kc.p, int64_t(kc.n), 0);
    cu::fill_nan(vc.p, int64_t(vc.n), 0);
    std::vector<int32_t> kv_pos(n_kv), ones(std::max(n_kv, n_q), 1);
    for (int i = 0; i < n_kv; ++i) kv_pos[i] = i;
    DBuf<int32_t> dkp(kv_pos.data(), kv_pos.size(), "flash kv pos");
    DBuf<int32_t> dslot(ones.data(), ones.size(), "flash slots");
    DBuf<int32_t> dpos(pos, size_t(n_q), "flash pos");
    cu::kv_store(dk.p, dv.p, kv_dim, n_kv, kv_dim, dslot.p, dkp.p, kc.p, vc.p, doff.p, 0, "flash test");

    int sms = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "flash test");
    cu::AttnPlan plan = cu::attn_plan(n_q, kv_max, n_head, sms, true);
    if (!routed) {
        plan.flash = true;
        plan.flash_len = split_len > 0 ? split_len : ((kv_max + 63) / 64) * 64;
        plan.flash_splits = (kv_max + plan.flash_len - 1) / plan.flash_len;
    }
    const size_t np = cu::attn_partials(n_q, n_head, plan);
    DBuf<float> part_o(np * head_dim, "flash partials");
    DBuf<float2> part_ml(np, "flash partials");
    DBuf<float> out(size_t(n_q) * q_dim, "flash out");
    cu::fill_nan(part_o.p, int64_t(part_o.n), 0);
    cu::fill_nan(out.p, int64_t(out.n), 0);
    cu::attention(dq.p, q_dim, kc.p, vc.p, doff.p, kv_dim, dslot.p, dpos.p, n_q, n_head, n_head_kv, head_dim,
                  plan, part_o.p, part_ml.p, out.p, q_dim, 0, "flash test");
    return out.download("flash out");
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

// ---------------------------------------------------------------- fused prompt kernels and the decode step
namespace {

std::vector<float> to_float(const std::vector<__half>& h) {
    std::vector<float> f(h.size());
    for (size_t i = 0; i < h.size(); ++i) f[i] = __half2float(h[i]);
    return f;
}

std::vector<uint16_t> to_bits(const std::vector<__half>& h) {
    std::vector<uint16_t> b(h.size());
    for (size_t i = 0; i < h.size(); ++i) b[i] = __half_as_ushort(h[i]);
    return b;
}

std::vector<__half> from_bits(const uint16_t* b, size_t n) {
    std::vector<__half> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = __ushort_as_half(b[i]);
    return h;
}

// A fresh fp16 K and V cache of n_slots x n_ctx positions of kv_dim, poisoned, and its slot table.
struct Cache {
    DBuf<__half> k, v;
    DBuf<int64_t> off;
    Cache(int n_slots, int n_ctx, int kv_dim, const char* what)
        : k(size_t(n_slots) * n_ctx * kv_dim, what), v(size_t(n_slots) * n_ctx * kv_dim, what),
          off(slot_offsets(n_slots, size_t(n_ctx) * kv_dim).data(), size_t(n_slots), what) {
        cu::fill_nan(k.p, int64_t(k.n), 0);
        cu::fill_nan(v.p, int64_t(v.n), 0);
    }
};

void check_slots_pos(const int32_t* slots, const int32_t* pos, int n, int n_slots, int n_ctx, const char* what) {
    if (n_slots < 1 || n_ctx < 1) throw Error(std::string(what) + ": n_slots and n_ctx must be >= 1");
    for (int i = 0; i < n; ++i) {
        if (slots[i] < 0 || slots[i] >= n_slots)
            throw Error(std::string(what) + ": slot " + std::to_string(slots[i]) + " out of range [0, " +
                        std::to_string(n_slots) + ")");
        if (pos[i] < 0 || pos[i] >= n_ctx)
            throw Error(std::string(what) + ": pos " + std::to_string(pos[i]) + " out of range [0, " +
                        std::to_string(n_ctx) + ")");
    }
}

// A host weight on the device as the engine holds it: rows as stored, plus 256
// bytes of padding (the decode kernels' 16-byte staging may read up to 15 bytes
// past the last row; the engine pads its uploads likewise).
struct DevWeight {
    std::vector<uint8_t> padded;
    DBuf<uint8_t> buf;
    cu::DTensor t;
    DevWeight(const HostWeight& h, const char* what) : padded(pad(h, what)), buf(padded.data(), padded.size(), what) {
        t = cu::DTensor{buf.p, h.type, int(h.n_in), int(h.n_out), int(bytes_for(h.type, h.n_in, what))};
    }
    static std::vector<uint8_t> pad(const HostWeight& h, const char* what) {
        if (h.n_in <= 0 || h.n_out <= 0 || h.n_in % 32 != 0)
            throw Error(std::string(what) + ": n_in must be a positive multiple of 32, n_out positive");
        const size_t need = bytes_for(h.type, h.n_in, what) * size_t(h.n_out);
        check_bytes(h.nbytes, need, what);
        if (need > (size_t(1) << 34)) throw Error(std::string(what) + ": weights too large");
        std::vector<uint8_t> p(need + 256, 0);
        std::memcpy(p.data(), h.data, need);
        return p;
    }
};

// Opts the decode kernels in to `smem` bytes (at least the 48 KB default), after
// checking the device allows it.
void dec_smem(size_t smem, const char* what) {
    int optin = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), what);
    if (smem > size_t(optin))
        throw Error(std::string(what) + ": needs " + std::to_string(smem) + " bytes of shared memory, the GPU allows " +
                    std::to_string(optin));
    cu::dec_set_smem_limit(std::max(smem, size_t(48) << 10));
}

}  // namespace

std::pair<std::vector<float>, std::vector<float>> kv_append(const float* k, const float* v, int n_tok, int kv_dim,
                                                            const int32_t* slots, const int32_t* pos, int n_slots,
                                                            int n_ctx) {
    ready();
    const char* what = "kv_append test";
    if (n_tok <= 0 || kv_dim <= 0) throw Error("kv_append test: empty shape");
    check_slots_pos(slots, pos, n_tok, n_slots, n_ctx, what);
    DBuf<float> dk(k, size_t(n_tok) * kv_dim, what), dv(v, size_t(n_tok) * kv_dim, what);
    DBuf<int32_t> ds(slots, size_t(n_tok), what), dp(pos, size_t(n_tok), what);
    Cache c(n_slots, n_ctx, kv_dim, what);
    cu::kv_store(dk.p, dv.p, kv_dim, n_tok, kv_dim, ds.p, dp.p, c.k.p, c.v.p, c.off.p, 0, what);
    return {to_float(c.k.download(what)), to_float(c.v.download(what))};
}

std::vector<float> qkv_post(const float* qkv, int n_tok, int n_head, int n_head_kv, int head_dim, const float* bq,
                            const float* bk, const float* bv, const int32_t* pos, const int32_t* slots, float base,
                            int n_slots, int n_ctx, std::vector<float>* kc, std::vector<float>* vc) {
    ready();
    const char* what = "qkv_post test";
    if (n_tok <= 0 || n_head <= 0 || n_head_kv <= 0 || head_dim <= 0) throw Error("qkv_post test: empty shape");
    check_slots_pos(slots, pos, n_tok, n_slots, n_ctx, what);
    const int qd = n_head * head_dim, kd = n_head_kv * head_dim, ld = qd + 2 * kd;
    DBuf<float> d(qkv, size_t(n_tok) * ld, what);
    DBuf<float> dbq(bq, bq ? size_t(qd) : 0, what), dbk(bk, bk ? size_t(kd) : 0, what),
        dbv(bv, bv ? size_t(kd) : 0, what);
    DBuf<int32_t> ds(slots, size_t(n_tok), what), dp(pos, size_t(n_tok), what);
    Cache c(n_slots, n_ctx, kd, what);
    cu::qkv_post(d.p, ld, n_tok, n_head, n_head_kv, head_dim, dbq.p, dbk.p, dbv.p, dp.p, ds.p, base, c.k.p, c.v.p,
                 c.off.p, 0, what);
    *kc = to_float(c.k.download(what));
    *vc = to_float(c.v.download(what));
    return d.download(what);
}

std::vector<uint16_t> rmsnorm_f16(const float* x, int64_t rows, int64_t n, const float* w, float eps) {
    ready();
    const char* what = "rmsnorm_f16 test";
    DBuf<float> dx(x, size_t(rows * n), what), dw(w, size_t(n), what);
    DBuf<__half> dy(size_t(rows * n), what);
    cu::fill_nan(dy.p, int64_t(dy.n), 0);
    cu::rmsnorm_f16(dx.p, int(rows), int(n), dw.p, eps, dy.p, 0, what);
    return to_bits(dy.download(what));
}

std::vector<uint16_t> swiglu_f16(const float* gu, int rows, int n) {
    ready();
    const char* what = "swiglu_f16 test";
    DBuf<float> dgu(gu, size_t(rows) * 2 * n, what);
    DBuf<__half> act(size_t(rows) * n, what);
    cu::fill_nan(act.p, int64_t(act.n), 0);
    cu::swiglu_f16(dgu.p, n, rows, act.p, 0, what);
    return to_bits(act.download(what));
}

std::vector<uint16_t> f32_to_f16(const float* x, int64_t n) {
    ready();
    const char* what = "f32_to_f16 test";
    DBuf<float> dx(x, size_t(n), what);
    DBuf<__half> dy(size_t(n), what);
    cu::fill_nan(dy.p, int64_t(dy.n), 0);
    cu::f32_to_f16(dx.p, n, dy.p, 0, what);
    return to_bits(dy.download(what));
}

std::vector<float> gemm_f16(const uint16_t* a16, int n_in, int n_out, const uint16_t* x16, int rows,
                            const float* y_init) {
    ready();
    const char* what = "gemm_f16 test";
    if (n_in <= 0 || n_out <= 0 || rows <= 0) throw Error("gemm_f16 test: empty shape");
    const std::vector<__half> ha = from_bits(a16, size_t(n_out) * n_in), hx = from_bits(x16, size_t(rows) * n_in);
    DBuf<__half> da(ha.data(), ha.size(), what), dx(hx.data(), hx.size(), what);
    DBuf<float> dy(size_t(rows) * n_out, what);
    if (y_init) CUDA_CHECK(cudaMemcpy(dy.p, y_init, dy.n * sizeof(float), cudaMemcpyHostToDevice), what);
    else cu::fill_nan(dy.p, int64_t(dy.n), 0);
    Blas blas;
    cu::gemm_f16(blas.h, da.p, n_in, n_out, dx.p, rows, dy.p, n_out, y_init != nullptr, what);
    return dy.download(what);
}

DecQkvOut dec_qkv(const HostWeight w[3], const float* const bias[3], const float* x, const HostWeight* emb,
                  int32_t token, const float* norm_w, float eps, int n_head, int n_head_kv, int head_dim, float base,
                  int pos, int slot, int n_slots, int n_ctx, int rows_per_part) {
    ready();
    const char* what = "dec_qkv test";
    const int n_embd = int(w[0].n_in), half = head_dim / 2;
    if (n_head <= 0 || n_head_kv <= 0 || head_dim <= 0 || head_dim % 2)
        throw Error("dec_qkv test: bad heads / head_dim");
    const int64_t outs[3] = {int64_t(n_head) * head_dim, int64_t(n_head_kv) * head_dim, int64_t(n_head_kv) * head_dim};
    for (int i = 0; i < 3; ++i)
        if (w[i].n_in != n_embd || w[i].n_out != outs[i])
            throw Error("dec_qkv test: q, k, v weights must be [n_head*head_dim | n_head_kv*head_dim, n_embd]");
    if ((x == nullptr) == (emb == nullptr)) throw Error("dec_qkv test: give either x or the embedding");
    if (emb && (emb->n_in != n_embd || token < 0 || token >= emb->n_out))
        throw Error("dec_qkv test: embedding rows must be n_embd long and token in range");
    const int32_t sl[1] = {slot}, ps[1] = {pos};
    check_slots_pos(sl, ps, 1, n_slots, n_ctx, what);
    const int S = rows_per_part > 0 ? rows_per_part : std::min(8, half);
    if (S > half) throw Error("dec_qkv test: rows_per_part > head_dim / 2");

    DevWeight wq(w[0], "dec_qkv test q"), wk(w[1], "dec_qkv test k"), wv(w[2], "dec_qkv test v");
    std::unique_ptr<DevWeight> we;
    if (emb) we = std::make_unique<DevWeight>(*emb, "dec_qkv test embedding");
    DBuf<float> db0(bias[0], bias[0] ? size_t(outs[0]) : 0, what), db1(bias[1], bias[1] ? size_t(outs[1]) : 0, what),
        db2(bias[2], bias[2] ? size_t(outs[2]) : 0, what);
    DBuf<float> dx(x, x ? size_t(n_embd) : 0, what), dn(norm_w, size_t(n_embd), what);
    DBuf<float> xo(emb ? size_t(n_embd) : 0, what), q(size_t(outs[0]), what);
    if (emb) cu::fill_nan(xo.p, int64_t(xo.n), 0);
    cu::fill_nan(q.p, int64_t(q.n), 0);
    Cache c(n_slots, n_ctx, int(outs[1]), what);
    // The engine's RoPE table (cuda_engine.cu): (cos, sin) of p * base^(-2i/head_dim),
    // exponent and angle in double. Only row `pos` is filled; the rows the kernel must
    // not read are NaN.
    std::vector<float2> tab(size_t(pos + 1) * half,
                            make_float2(std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::quiet_NaN()));
    const double log2_base = std::log2(double(base));
    for (int i = 0; i < half; ++i) {
        const double th = double(pos) * std::exp2(-2.0 * double(i) / double(head_dim) * log2_base);
        tab[size_t(pos) * half + i] = make_float2(float(std::cos(th)), float(std::sin(th)));
    }
    DBuf<float2> rope(tab.data(), tab.size(), what);
    const cu::DecState hs{token, pos, slot, 0};
    DBuf<cu::DecState> st(&hs, 1, what);

    cu::DecQkvArgs a{};
    a.w[0] = wq.t;
    a.w[1] = wk.t;
    a.w[2] = wv.t;
    a.bias[0] = db0.p;
    a.bias[1] = db1.p;
    a.bias[2] = db2.p;
    a.x = emb ? xo.p : dx.p;  // embedding input: block 0 writes the row there
    if (emb) a.emb = we->t;
    a.embed = emb ? 1 : 0;
    a.norm_w = dn.p;
    a.eps = eps;
    a.n_embd = n_embd;
    a.n_head = n_head;
    a.n_head_kv = n_head_kv;
    a.head_dim = head_dim;
    a.S = S;
    a.parts = (half + S - 1) / S;
    a.rope = rope.p;
    a.q_out = q.p;
    a.kc = c.k.p;
    a.vc = c.v.p;
    a.slot_off = c.off.p;
    a.kv_dim = int(outs[1]);
    a.st = st.p;
    a.need_q8 = cu::dec_int8_type(w[0].type) || cu::dec_int8_type(w[1].type) || cu::dec_int8_type(w[2].type);
    const int rb = std::max({wq.t.row_bytes, wk.t.row_bytes, wv.t.row_bytes});
    a.smem_w = int(2 * cu::dec_stage_bytes(S, rb));
    a.pdl_early = 0;
    dec_smem(cu::dec_qkv_smem(a), what);
    cu::dec_qkv(a, 0, false, what);
    DecQkvOut out;
    out.q = q.download(what);
    out.kc = to_float(c.k.download(what));
    out.vc = to_float(c.v.download(what));
    if (emb) out.x = xo.download(what);
    return out;
}

namespace {
// Microseconds per launch of a CUDA graph of what `body` puts on a stream: a warm-up launch,
// then `rounds` launches between two events (the timing entries below).
double graph_us(const std::function<void(cudaStream_t)>& body, int rounds, const char* what) {
    cudaStream_t s = nullptr;
    cudaGraph_t g = nullptr;
    cudaGraphExec_t ge = nullptr;
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    float ms = 0.f;
    auto cleanup = [&] {
        if (ge) cudaGraphExecDestroy(ge);
        if (g) cudaGraphDestroy(g);
        if (e0) cudaEventDestroy(e0);
        if (e1) cudaEventDestroy(e1);
        if (s) cudaStreamDestroy(s);
    };
    try {
        CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), what);
        CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), what);
        try {
            body(s);
        } catch (...) {
            cudaStreamEndCapture(s, &g);
            throw;
        }
        CUDA_CHECK(cudaStreamEndCapture(s, &g), what);
        CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0), what);
        CUDA_CHECK(cudaEventCreate(&e0), what);
        CUDA_CHECK(cudaEventCreate(&e1), what);
        CUDA_CHECK(cudaGraphLaunch(ge, s), what);  // warm-up
        CUDA_CHECK(cudaEventRecord(e0, s), what);
        for (int i = 0; i < rounds; ++i) CUDA_CHECK(cudaGraphLaunch(ge, s), what);
        CUDA_CHECK(cudaEventRecord(e1, s), what);
        CUDA_CHECK(cudaStreamSynchronize(s), what);
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1), what);
    } catch (...) {
        cleanup();
        throw;
    }
    cleanup();
    return 1000.0 * double(ms) / rounds;
}

// The shape and variant part of a dec_attn launch's arguments (the buffers are the caller's).
struct AttnShape {
    int n_head, n_head_kv, head_dim, max_splits, split_keys, cluster, clusters;
    bool cluster_mma;
    int stage;
};
cu::DecAttnArgs attn_args(const AttnShape& sh) {
    cu::DecAttnArgs a{};
    a.kv_dim = sh.n_head_kv * sh.head_dim;
    a.n_head = sh.n_head;
    a.n_head_kv = sh.n_head_kv;
    a.head_dim = sh.head_dim;
    a.scale = 1.0f / std::sqrt(float(sh.head_dim));
    a.max_splits = sh.max_splits;
    a.split_keys = sh.split_keys;
    a.cluster = sh.cluster;
    a.clusters = sh.clusters;
    a.cluster_mma = sh.cluster_mma ? 1 : 0;
    a.stage = sh.stage;
    return a;
}
}  // namespace

std::pair<std::vector<float>, std::vector<float>> dec_attn(const float* q, int n_head, const float* k, const float* v,
                                                           int n_kv, int n_head_kv, int head_dim, int cluster,
                                                           int max_splits, int split_keys, bool cluster_mma,
                                                           int clusters, int stage) {
    ready();
    const char* what = cluster ? "dec_attn test (cluster)" : "dec_attn test (global merge)";
    if (n_kv <= 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv) throw Error("dec_attn test: bad shape");
    if (head_dim <= 0 || head_dim % 8) throw Error("dec_attn test: head_dim must be a positive multiple of 8");
    if (n_head / n_head_kv * head_dim > cu::kDecMaxGroupDim || n_head_kv > cu::kDecMaxKvHeads)
        throw Error("dec_attn test: (n_head/n_head_kv)*head_dim or n_head_kv beyond the kernel's limits");
    if (max_splits < 1 || max_splits > cu::kDecMaxSplits)
        throw Error("dec_attn test: max_splits must be in [1, " + std::to_string(cu::kDecMaxSplits) + "]");
    if (cluster < 0 || cluster > cu::kDecAttnClusterMax)
        throw Error("dec_attn test: cluster must be in [0, " + std::to_string(cu::kDecAttnClusterMax) + "]");
    if (cluster) {
        int major = 0;
        CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), what);
        if (major < 9) throw Error("dec_attn test: the cluster variant needs compute capability 9.0");
    }
    const int kd = n_head_kv * head_dim, qd = n_head * head_dim, pos = n_kv - 1;
    // Slot 1 of 2 holds positions 0..pos; slot 0 and positions past pos stay NaN.
    const int n_ctx = n_kv + 7, slot = 1;
    Cache c(2, n_ctx, kd, what);
    {
        std::vector<int32_t> kv_pos(n_kv), slots(n_kv, slot);
        for (int i = 0; i < n_kv; ++i) kv_pos[i] = i;
        DBuf<float> dk(k, size_t(n_kv) * kd, what), dv(v, size_t(n_kv) * kd, what);
        DBuf<int32_t> dp(kv_pos.data(), kv_pos.size(), what), ds(slots.data(), slots.size(), what);
        cu::kv_store(dk.p, dv.p, kd, n_kv, kd, ds.p, dp.p, c.k.p, c.v.p, c.off.p, 0, what);
    }
    DBuf<float> dq(q, size_t(qd), what), out(size_t(qd), what);
    DBuf<float> part_o(size_t(n_head) * max_splits * head_dim, what);
    DBuf<float2> part_ml(size_t(n_head) * max_splits, what);
    DBuf<unsigned> counter(size_t(n_head_kv), what);
    CUDA_CHECK(cudaMemset(counter.p, 0, counter.n * sizeof(unsigned)), what);
    const cu::DecState hs{0, pos, slot, 0};
    DBuf<cu::DecState> st(&hs, 1, what);
    if (stage < 0 || (stage > 0 && (!cluster || !cluster_mma)))
        throw Error("dec_attn test: stage goes with the cluster variant on tensor cores, >= 0");
    cu::DecAttnArgs a = attn_args({n_head, n_head_kv, head_dim, max_splits, split_keys, cluster, clusters, cluster_mma, stage});
    a.q = dq.p;
    a.kc = c.k.p;
    a.vc = c.v.p;
    a.slot_off = c.off.p;
    a.part_o = part_o.p;
    a.part_ml = part_ml.p;
    a.out = out.p;
    a.counter = counter.p;
    a.st = st.p;
    a.pdl_early = 0;
    const bool parts = cluster > 0 && clusters > 1;
    dec_smem(std::max(cu::dec_attn_smem(n_head, n_head_kv, head_dim), cu::dec_attn_lean_smem(n_head, n_head_kv, head_dim, stage)), what);
    // Twice on the same buffers: the global merge's completion counters must be back
    // at zero after a launch, or the second one never merges (its output stays NaN).
    std::vector<float> r[2];
    for (int run = 0; run < 2; ++run) {
        cu::fill_nan(out.p, int64_t(out.n), 0);
        cu::fill_nan(part_o.p, int64_t(part_o.n), 0);
        CUDA_CHECK(cudaMemset(part_ml.p, 0xff, part_ml.n * sizeof(float2)), what);  // NaN patterns
        cu::dec_attention(a, 0, false, what);
        r[run] = out.download(what);
        if (parts) {  // the clusters' partials merged as load_act_parts does, in float64
            const std::vector<float> po = part_o.download(what);
            const std::vector<float2> ml = part_ml.download(what);
            for (int h = 0; h < n_head; ++h) {
                double M = -INFINITY;
                for (int c = 0; c < clusters; ++c) M = std::max(M, double(ml[size_t(c) * n_head + h].x));
                double L = 0;
                for (int c = 0; c < clusters; ++c) {
                    const float2 m = ml[size_t(c) * n_head + h];
                    L += std::exp(double(m.x) - M) * m.y;
                }
                for (int d = 0; d < head_dim; ++d) {
                    double acc = 0;
                    for (int c = 0; c < clusters; ++c)
                        acc += std::exp(double(ml[size_t(c) * n_head + h].x) - M) *
                               po[size_t(c) * qd + size_t(h) * head_dim + d];
                    r[run][size_t(h) * head_dim + d] = float(acc / L);
                }
            }
        }
    }
    return {std::move(r[0]), std::move(r[1])};
}

double dec_attn_time(int n_head, int n_head_kv, int head_dim, int n_kv, int cluster, int max_splits, int split_keys,
                     bool cluster_mma, int layers, int iters, int clusters, int stage) {
    ready();
    const char* what = "dec_attn_time";
    if (n_kv <= 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv || head_dim <= 0 || head_dim % 8)
        throw Error("dec_attn_time: bad shape");
    if (cluster < 0 || cluster > cu::kDecAttnClusterMax || max_splits < 1 || max_splits > cu::kDecMaxSplits ||
        layers < 1 || iters < 1)
        throw Error("dec_attn_time: cluster in [0, 16], max_splits in [1, 64], layers and iters >= 1");
    const int kd = n_head_kv * head_dim, qd = n_head * head_dim;
    struct Layer {
        DBuf<__half> k, v;
        DBuf<float> part_o;
        DBuf<float2> part_ml;
        DBuf<unsigned> counter;
        DBuf<float> out;
    };
    const int64_t zero_off = 0;
    DBuf<int64_t> off(&zero_off, 1, what);
    const cu::DecState hs{0, n_kv - 1, 0, 0};
    DBuf<cu::DecState> st(&hs, 1, what);
    DBuf<float> dq(size_t(qd), what);
    CUDA_CHECK(cudaMemset(dq.p, 0, dq.n * sizeof(float)), what);
    std::vector<std::unique_ptr<Layer>> ls;
    std::vector<cu::DecAttnArgs> args;
    for (int l = 0; l < layers; ++l) {
        auto L = std::unique_ptr<Layer>(new Layer{DBuf<__half>(size_t(n_kv) * kd, what), DBuf<__half>(size_t(n_kv) * kd, what),
                                                  DBuf<float>(size_t(n_head) * max_splits * head_dim, what),
                                                  DBuf<float2>(size_t(n_head) * max_splits, what),
                                                  DBuf<unsigned>(size_t(n_head_kv), what), DBuf<float>(size_t(qd), what)});
        CUDA_CHECK(cudaMemset(L->k.p, 0, L->k.n * sizeof(__half)), what);
        CUDA_CHECK(cudaMemset(L->v.p, 0, L->v.n * sizeof(__half)), what);
        CUDA_CHECK(cudaMemset(L->counter.p, 0, L->counter.n * sizeof(unsigned)), what);
        cu::DecAttnArgs a =
            attn_args({n_head, n_head_kv, head_dim, max_splits, split_keys, cluster, clusters, cluster_mma, stage});
        a.q = dq.p;
        a.kc = L->k.p;
        a.vc = L->v.p;
        a.slot_off = off.p;
        a.part_o = L->part_o.p;
        a.part_ml = L->part_ml.p;
        a.out = L->out.p;
        a.counter = L->counter.p;
        a.st = st.p;
        args.push_back(a);
        ls.push_back(std::move(L));
    }
    dec_smem(std::max(cu::dec_attn_smem(n_head, n_head_kv, head_dim), cu::dec_attn_lean_smem(n_head, n_head_kv, head_dim, stage)), what);
    const double us = graph_us(
        [&](cudaStream_t st) {
            for (const cu::DecAttnArgs& a : args) cu::dec_attention(a, st, false, what);
        },
        iters, what);
    return us / layers;
}

std::vector<float> dec_proj(int mode, const HostWeight& w0, const HostWeight* w1, const float* act,
                            const float* norm_w, float eps, const float* y_init, int rows_per_block) {
    ready();
    const char* what = mode == cu::DEC_GLU ? "dec_proj test (GLU)" : "dec_proj test (RESID)";
    if (mode != cu::DEC_RESID && mode != cu::DEC_GLU) throw Error("dec_proj test: mode must be RESID (0) or GLU (1)");
    const bool glu = mode == cu::DEC_GLU;
    if (glu != (w1 != nullptr) || glu != (norm_w != nullptr) || glu == (y_init != nullptr))
        throw Error("dec_proj test: RESID takes one weight and y_init, GLU two weights and norm_w");
    if (w1 && (w1->n_in != w0.n_in || w1->n_out != w0.n_out)) throw Error("dec_proj test: gate and up differ in shape");
    if (rows_per_block < 1 || rows_per_block > 64) throw Error("dec_proj test: rows_per_block must be in [1, 64]");
    const int n_in = int(w0.n_in), n_out = int(w0.n_out);
    DevWeight d0(w0, "dec_proj test w0");
    std::unique_ptr<DevWeight> d1;
    if (w1) d1 = std::make_unique<DevWeight>(*w1, "dec_proj test w1");
    DBuf<float> da(act, size_t(n_in), what), dn(norm_w, norm_w ? size_t(n_in) : 0, what);
    DBuf<float> dy(size_t(n_out), what);
    if (y_init) CUDA_CHECK(cudaMemcpy(dy.p, y_init, dy.n * sizeof(float), cudaMemcpyHostToDevice), what);
    else cu::fill_nan(dy.p, int64_t(dy.n), 0);
    cu::DecProjArgs a{};
    a.w[0] = d0.t;
    if (d1) a.w[1] = d1->t;
    a.n_tensors = d1 ? 2 : 1;
    a.rows_per_block = rows_per_block;
    a.act = da.p;
    a.norm_w = dn.p;
    a.eps = eps;
    a.need_q8 = cu::dec_int8_type(w0.type) || (w1 && cu::dec_int8_type(w1->type));
    a.mode = mode;
    a.y = dy.p;
    // the engine's plan (plan_proj): n_tensors staged ranges of rows_per_block rows of the longest row
    const int rb = std::max(d0.t.row_bytes, d1 ? d1->t.row_bytes : 0);
    a.smem_w = int(size_t(a.n_tensors) * cu::dec_stage_bytes(rows_per_block, rb));
    a.pdl_early = 0;
    dec_smem(cu::dec_proj_smem(a), what);
    cu::dec_proj(a, 0, false, what);
    return dy.download(what);
}


namespace {
// sample_rows' inputs on the device: logits, histories, rows, outputs and the workspace.
struct SampleSetup {
    DBuf<float> logits;
    std::vector<int32_t> flat_hist;  // every row's history, one after another
    DBuf<int32_t> hist;
    std::vector<cu::SampleRow> rows;
    std::unique_ptr<DBuf<cu::SampleRow>> d_rows;
    DBuf<int32_t> tok;
    DBuf<uint64_t> state;
    DBuf<uint8_t> work;
    static std::vector<int32_t> flat(const std::vector<std::vector<int32_t>>& histories, int n_vocab) {
        std::vector<int32_t> f;
        for (const auto& h : histories)
            for (int32_t t : h) {
                if (t < 0 || t >= n_vocab) throw Error("sample_rows: history token " + std::to_string(t) + " out of range");
                f.push_back(t);
            }
        return f;
    }
    SampleSetup(const float* host_logits, int n_rows, int n_vocab, const std::vector<SamplerParams>& params,
                const std::vector<uint64_t>& states, const std::vector<std::vector<int32_t>>& histories)
        : logits(host_logits, size_t(n_rows) * size_t(n_vocab), "sample_rows logits"),
          flat_hist(flat(histories, n_vocab)),
          hist(flat_hist.data(), flat_hist.size(), "sample_rows history"),
          tok(size_t(n_rows), "sample_rows tokens"), state(size_t(n_rows), "sample_rows states"),
          work(cu::sample_workspace_bytes(n_rows, n_vocab), "sample_rows workspace") {
        size_t off = 0;
        for (int r = 0; r < n_rows; ++r) {
            validate(params[size_t(r)]);
            if (!device_sampling_supports(params[size_t(r)], n_vocab, int(histories[size_t(r)].size())))
                throw Error("sample_rows: row " + std::to_string(r) +
                            ": parameters beyond the device sampler (device_sampling_supports)");
            rows.push_back({params[size_t(r)], states[size_t(r)], hist.p ? hist.p + off : nullptr,
                            int(histories[size_t(r)].size())});
            off += histories[size_t(r)].size();
        }
        d_rows = std::make_unique<DBuf<cu::SampleRow>>(rows.data(), rows.size(), "sample_rows rows");
        CUDA_CHECK(cudaMemset(tok.p, 0xFF, size_t(n_rows) * 4), "sample_rows");
    }
};

void check_sample_args(int n_rows, int n_vocab, const std::vector<SamplerParams>& params,
                       const std::vector<uint64_t>& states, const std::vector<std::vector<int32_t>>& histories) {
    if (n_rows < 1 || n_vocab < 1) throw Error("sample_rows: need n_rows >= 1 and n_vocab >= 1");
    if (params.size() != size_t(n_rows) || states.size() != size_t(n_rows) || histories.size() != size_t(n_rows))
        throw Error("sample_rows: params, states and histories need one entry per row");
}
}  // namespace

std::vector<float> apply_token_masks(const float* logits, int n_rows, int n_vocab, const uint32_t* masks) {
    ready();
    if (n_rows < 1 || n_vocab < 1) throw Error("apply_token_masks: need n_rows >= 1 and n_vocab >= 1");
    const size_t words = size_t(token_mask_words(n_vocab));
    DBuf<float> d(logits, size_t(n_rows) * size_t(n_vocab), "apply_token_masks logits");
    // the masked rows in reverse order, so a mask's row is not its own index
    std::vector<int32_t> rows_of(static_cast<size_t>(n_rows));
    std::vector<uint32_t> by_slot(size_t(n_rows) * words);
    for (int i = 0; i < n_rows; ++i) {
        rows_of[size_t(i)] = n_rows - 1 - i;
        std::copy(masks + size_t(n_rows - 1 - i) * words, masks + size_t(n_rows - i) * words, by_slot.begin() + ptrdiff_t(size_t(i) * words));
    }
    DBuf<int32_t> r(rows_of.data(), rows_of.size(), "apply_token_masks rows");
    DBuf<uint32_t> mm(by_slot.data(), by_slot.size(), "apply_token_masks masks");
    cu::launch_apply_token_masks(d.p, n_vocab, n_rows, r.p, mm.p, nullptr);
    return d.download("apply_token_masks");
}

std::pair<std::vector<int32_t>, std::vector<uint64_t>> sample_rows(const float* logits, int n_rows, int n_vocab,
                                                                   const std::vector<SamplerParams>& params,
                                                                   const std::vector<uint64_t>& states,
                                                                   const std::vector<std::vector<int32_t>>& histories, bool split,
                                                                   bool split_full) {
    ready();
    check_sample_args(n_rows, n_vocab, params, states, histories);
    SampleSetup d(logits, n_rows, n_vocab, params, states, histories);
    cu::launch_sample_rows(d.logits.p, n_rows, n_vocab, d.d_rows->p, d.tok.p, d.state.p, nullptr, d.work.p, nullptr,
                           split, split_full);
    return {d.tok.download("sample_rows"), d.state.download("sample_rows")};
}

double sample_rows_time(const float* logits, int n_rows, int n_vocab, const std::vector<SamplerParams>& params,
                        const std::vector<std::vector<int32_t>>& histories, bool split, int iters, bool split_full) {
    ready();
    const char* what = "sample_rows_time";
    const std::vector<uint64_t> states(size_t(std::max(n_rows, 0)), 1234u);
    check_sample_args(n_rows, n_vocab, params, states, histories);
    if (iters < 1) throw Error("sample_rows_time: iters must be >= 1");
    SampleSetup d(logits, n_rows, n_vocab, params, states, histories);
    // as the engine launches it: the host rows pick the kernels
    const double us = graph_us(
        [&](cudaStream_t st) {
            for (int i = 0; i < iters; ++i)
                cu::launch_sample_rows(d.logits.p, n_rows, n_vocab, d.d_rows->p, d.tok.p, d.state.p, st, d.work.p,
                                       d.rows.data(), split, split_full);
        },
        1, what);
    return us / iters;
}

}  // namespace cuda_test
}  // namespace orcd
