// matmul.cpp - the CPU matmul's public face: argument checks, views, and the
// dispatch to the kernel variant chosen at run time.
//
// The kernels and their numeric scheme: cpu_kernels_impl.h, compiled once per
// instruction set (cpu_kernels.h). The variant is picked once per process:
// ORCD_CPU_KERNEL=scalar|avx2|avx512 when set (lowered to the best this CPU
// runs, with a note on stderr; an unknown name is an error at the first
// matmul or matmul_kernel_name), else the best this CPU runs (cpu_features.h).
// matmul_set_kernel switches it for tests.
#include "matmul.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "block_formats.h"
#include "cpu_features.h"
#include "cpu_kernels.h"
#include "error.h"
#include "quants.h"

namespace orcd {
namespace {

std::atomic<int> g_override{-1};  // matmul_set_kernel: a CpuKernel, or -1 for the default

// ORCD_CPU_KERNEL, clamped to this CPU, else the best this CPU runs. Throws
// (every call, until the variable is fixed) for an unknown name.
CpuKernel default_kernel() {
    static const CpuKernel k = [] {
        const CpuKernel best = cpu_kernel_best();
        const char* env = std::getenv("ORCD_CPU_KERNEL");
        if (!env || !*env) return best;
        const CpuKernel want = parse_cpu_kernel(env, "ORCD_CPU_KERNEL");
        if ((int)want <= (int)best) return want;
        std::fprintf(stderr, "orcd: ORCD_CPU_KERNEL=%s: this CPU runs at most the %s kernels; using those\n", env,
                     cpu_kernel_name(best));
        return best;
    }();
    return k;
}

CpuKernel current_kernel() {
    const int o = g_override.load(std::memory_order_relaxed);
    return o >= 0 ? (CpuKernel)o : default_kernel();
}

CpuMatmulFn kernel_fn(CpuKernel k) {
    switch (k) {
#if ORCD_CPU_X86
        case CpuKernel::Avx512: return cpu_avx512::matmul;
        case CpuKernel::Avx2: return cpu_avx2::matmul;
#endif
        default: return cpu_scalar::matmul;
    }
}

void check_view(const WeightView& w) {
    const TypeInfo* ti = type_info(w.type);
    if (!ti || !matmul_supports(w.type))
        throw Error(std::string("matmul: weight type ") + type_name(w.type) + " has no CPU matmul kernel");
    if (w.n_in <= 0 || w.n_out < 0 || w.n_in % ti->block_size != 0)
        throw Error("matmul: n_in " + std::to_string(w.n_in) + " is not a positive multiple of the " +
                    ti->name + " block size " + std::to_string(ti->block_size));
    // Rows may be further apart than their size (a strided view, e.g. one
    // head of a KV cache), never closer.
    if (w.row_bytes < (size_t)(w.n_in / ti->block_size * ti->block_bytes))
        throw Error("matmul: row_bytes " + std::to_string(w.row_bytes) + " is less than one row of n_in " +
                    std::to_string(w.n_in) + " " + ti->name + " elements");
    if (!w.data && w.n_out > 0) throw Error("matmul: weight data is null");
}


}  // namespace

// ------------------------------------------------------------------ public API
bool matmul_has_kernel(uint32_t type) {
    switch (type) {
        case T_F32: case T_F16: case T_BF16: case T_Q4_0: case T_Q5_0: case T_Q8_0:
        case T_Q4_K: case T_Q5_K: case T_Q6_K:
            return true;
        default:
            return false;
    }
}

bool matmul_supports(uint32_t type) { return matmul_has_kernel(type) || can_dequantize(type); }

const char* matmul_kernel_name() { return cpu_kernel_name(current_kernel()); }

const char* matmul_set_kernel(const std::string& name) {
    if (name.empty()) {
        g_override.store(-1);
    } else {
        CpuKernel k = parse_cpu_kernel(name, "CPU kernel");
        if ((int)k > (int)cpu_kernel_best()) k = cpu_kernel_best();
        g_override.store((int)k);
    }
    return matmul_kernel_name();
}

void matmul_force_scalar(bool on) { matmul_set_kernel(on ? "scalar" : ""); }

WeightView make_weight_view(uint32_t type, const void* data, int64_t n_in, int64_t n_out) {
    const TypeInfo* ti = type_info(type);
    if (!ti || !matmul_supports(type))
        throw Error(std::string("matmul: weight type ") + type_name(type) + " has no CPU matmul kernel");
    if (n_in <= 0 || n_in % ti->block_size != 0)
        throw Error("matmul: n_in " + std::to_string(n_in) + " is not a positive multiple of the " + ti->name +
                    " block size " + std::to_string(ti->block_size));
    if (n_out < 0) throw Error("matmul: n_out " + std::to_string(n_out) + " is negative");
    WeightView w;
    w.type = type;
    w.data = static_cast<const uint8_t*>(data);
    w.n_in = n_in;
    w.n_out = n_out;
    w.row_bytes = (size_t)(n_in / ti->block_size * ti->block_bytes);
    return w;
}

WeightView weight_view(const TensorInfo& t) {
    if (t.n_dims != 2 || t.ne[2] != 1 || t.ne[3] != 1)
        throw Error("tensor '" + t.name + "' " + t.shape_str() + ": matmul needs a 2-D weight");
    if (!matmul_supports(t.type))
        throw Error("tensor '" + t.name + "': type " + type_name(t.type) + " has no CPU matmul kernel");
    const TypeInfo* ti = type_info(t.type);
    if (t.ne[0] % ti->block_size != 0)
        throw Error("tensor '" + t.name + "' " + t.shape_str() + ": ne[0] is not a multiple of the " + ti->name +
                    " block size");
    WeightView w = make_weight_view(t.type, t.data, t.ne[0], t.ne[1]);
    return w;
}

void weight_row(const WeightView& w, int64_t row, float* dst) {
    check_view(w);
    if (row < 0 || row >= w.n_out)
        throw Error("weight_row: row " + std::to_string(row) + " out of range [0, " + std::to_string(w.n_out) + ")");
    const uint8_t* p = w.data + row * w.row_bytes;
    switch (w.type) {
        case T_F32: std::memcpy(dst, p, w.n_in * sizeof(float)); return;
        case T_F16: for (int64_t k = 0; k < w.n_in; ++k) dst[k] = read_fp16le(p + 2 * k); return;
        case T_BF16: for (int64_t k = 0; k < w.n_in; ++k) dst[k] = bf16_bits_to_fp32(read_u16le(p + 2 * k)); return;
        default: dequantize_row(w.type, p, dst, w.n_in);
    }
}

void matmul(const WeightView& w, const float* x, int64_t m, float* y, ThreadPool& pool) {
    check_view(w);
    if (m < 0) throw Error("matmul: m " + std::to_string(m) + " is negative");
    if (m == 0 || w.n_out == 0) return;
    kernel_fn(current_kernel())(w, x, m, y, pool);
}

std::vector<std::string> matmul_kernels() { return cpu_kernels_supported(); }

}  // namespace orcd
