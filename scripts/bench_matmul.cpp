// bench_matmul.cpp - speed of orcd::matmul on the real model's weights.
//
// Runs every matmul of one forward pass of a GGUF Qwen2 model (per layer
// q, k, v, o, gate, up, down; plus output.weight for the last row only, as in
// generation) for m activation rows, and reports the time per pass, GFLOP/s
// per tensor kind and the implied tokens/s of the matmuls alone (attention,
// norms etc. not included). Also times single shapes per type.
//
// Build: the CMake target orcd_bench_matmul (option ORCD_BUILD_BENCH), e.g.
//   cmake -S . -B build/bench -DORCD_PYTHON=OFF -DORCD_CUDA=OFF -DORCD_BUILD_BENCH=ON
//   cmake --build build/bench --target orcd_bench_matmul
// (scripts/bench_matmul.py speed|micro does both). Run:
//   build/bench/orcd_bench_matmul /root/qwen05.gguf [m ...] [--threads N ...] [--reps R]
//   build/bench/orcd_bench_matmul --micro [m ...] [--threads N]    (kernel speed, cache-resident)
//   --scalar forces the portable kernels.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "ggml_types.h"
#include "gguf.h"
#include "matmul.h"
#include "threadpool.h"

using namespace orcd;
using clk = std::chrono::steady_clock;

static double secs(clk::time_point a, clk::time_point b) { return std::chrono::duration<double>(b - a).count(); }
static double cpu_secs() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

struct Item {
    std::string kind;  // q, k, v, o, gate, up, down, output
    WeightView w;
};

// Cache-resident kernel speed: n_in x n_out weights of each type (random
// codes, sane scales) that fit in L2, one thread, m activation rows.
static void micro(const std::vector<int64_t>& ms, int nt) {
    const uint32_t types[] = {T_Q4_0, T_Q5_0, T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K, T_F16, T_BF16, T_F32, T_Q4_1, T_Q3_K};
    const int64_t n_in = 4864, n_out = 64;
    std::mt19937 rng(3);
    ThreadPool pool(nt);
    std::printf("micro: %lld x %lld weights (L2-resident), %d thread(s), kernels %s\n", (long long)n_in,
                (long long)n_out, nt, matmul_kernel_name());
    for (uint32_t type : types) {
        const TypeInfo* ti = type_info(type);
        const size_t bytes = (size_t)(n_in / ti->block_size * ti->block_bytes * n_out);
        std::vector<uint8_t> wb(bytes);
        for (auto& b : wb) b = (uint8_t)(rng() & 0x3F);  // small values: finite fp16/f32/bf16 scales
        WeightView w = make_weight_view(type, wb.data(), n_in, n_out);
        std::printf("  %-5s", ti->name);
        for (int64_t m : ms) {
            std::vector<float> x((size_t)(m * n_in), 0.5f), y((size_t)(m * n_out));
            for (size_t i = 0; i < x.size(); ++i) x[i] = (float)((i * 7919) % 200) / 100.0f - 1.0f;
            matmul(w, x.data(), m, y.data(), pool);
            int reps = 1;
            double t = 0, tc = 0;
            for (;;) {
                auto t0 = clk::now();
                const double c0 = cpu_secs();
                for (int r = 0; r < reps; ++r) matmul(w, x.data(), m, y.data(), pool);
                t = secs(t0, clk::now());
                tc = cpu_secs() - c0;
                if (t > 0.2) break;
                reps *= 2;
            }
            const double gf = 2.0 * m * n_in * n_out * reps * 1e-9;
            // wall-clock rate, and the rate per second of process CPU time
            // (less sensitive to other load on the machine)
            std::printf("  m=%-3lld %6.1f (%6.1f cpu) GF/s", (long long)m, gf / t, gf * nt / tc);
        }
        std::printf("\n");
    }
}

int main(int argc, char** argv) {
    std::string path = "/root/qwen05.gguf";
    std::vector<int64_t> ms;
    std::vector<int> threads;
    int reps = 0;
    bool do_micro = false;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--micro")
            do_micro = true;
        else if (a == "--scalar")
            matmul_force_scalar(true);
        else if (a == "--threads" && i + 1 < argc)
            threads.push_back(std::atoi(argv[++i]));
        else if (a == "--reps" && i + 1 < argc)
            reps = std::atoi(argv[++i]);
        else if (!a.empty() && a[0] >= '0' && a[0] <= '9')
            ms.push_back(std::atoll(a.c_str()));
        else
            path = a;
    }
    if (ms.empty()) ms = {1, 512};
    if (threads.empty()) threads = {1, 2};
    if (do_micro) {
        for (int nt : threads) micro(ms, nt);
        return 0;
    }

    GGUFFile f(path);
    std::vector<Item> items;
    int n_layer = 0;
    while (f.find_tensor("blk." + std::to_string(n_layer) + ".attn_q.weight")) ++n_layer;
    const char* names[][2] = {{"q", "attn_q"}, {"k", "attn_k"}, {"v", "attn_v"}, {"o", "attn_output"},
                              {"gate", "ffn_gate"}, {"up", "ffn_up"}, {"down", "ffn_down"}};
    for (int l = 0; l < n_layer; ++l)
        for (auto& nm : names)
            items.push_back({nm[0], weight_view(f.tensor("blk." + std::to_string(l) + "." + nm[1] + ".weight"))});
    const TensorInfo* out = f.find_tensor("output.weight");
    if (!out) out = &f.tensor("token_embd.weight");
    items.push_back({"output", weight_view(*out)});
    std::printf("model %s: %d layers, kernels %s\n", path.c_str(), n_layer, matmul_kernel_name());

    int64_t max_in = 0, max_out = 0;
    for (auto& it : items) {
        max_in = std::max(max_in, it.w.n_in);
        max_out = std::max(max_out, it.w.n_out);
    }
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 1.0f);

    for (int nt : threads) {
        ThreadPool pool(nt);
        for (int64_t m : ms) {
            std::vector<float> x((size_t)(m * max_in)), y((size_t)(m * std::max<int64_t>(max_out / (m > 1 ? 8 : 1), 4864)));
            for (auto& v : x) v = nd(rng);
            std::vector<float> ylog((size_t)max_out);
            // warm-up: one pass (pages in the mapping)
            const int R = reps > 0 ? reps : (m == 1 ? 20 : 1);
            std::map<std::string, double> t_kind, flop_kind;
            double t_total = 0;
            for (int rep = -1; rep < R; ++rep) {
                for (auto& it : items) {
                    const bool is_out = it.kind == "output";
                    const int64_t mm = is_out ? 1 : m;
                    float* yp = is_out ? ylog.data() : y.data();
                    auto t0 = clk::now();
                    matmul(it.w, x.data(), mm, yp, pool);
                    auto t1 = clk::now();
                    if (rep >= 0) {
                        t_kind[it.kind] += secs(t0, t1);
                        flop_kind[it.kind] += 2.0 * mm * it.w.n_in * it.w.n_out;
                        t_total += secs(t0, t1);
                    }
                }
            }
            std::printf("\nthreads %d, m = %lld (%d passes; output.weight for 1 row)\n", nt, (long long)m, R);
            for (auto& kv : t_kind)
                std::printf("  %-7s %8.3f ms/pass  %7.1f GFLOP/s\n", kv.first.c_str(), 1e3 * kv.second / R,
                            flop_kind[kv.first] / kv.second * 1e-9);
            double flops = 0;
            for (auto& kv : flop_kind) flops += kv.second;
            std::printf("  total   %8.3f ms/pass  %7.1f GFLOP/s  => %.1f tokens/s (matmuls only)\n",
                        1e3 * t_total / R, flops / t_total * 1e-9, m * R / t_total);
        }
    }
    return 0;
}
