// decode_profiler.cu - profile_decode_step (decode_profiler.cuh).
#include <vector>

#include "decode_profiler.cuh"

namespace orcd {

const char* decode_kernel_name(DecodeKernel k) {
    switch (k) {
    case DecodeKernel::qkv: return "qkv";
    case DecodeKernel::attention: return "attention";
    case DecodeKernel::attn_output: return "attn_output";
    case DecodeKernel::ffn_gate_up: return "ffn_gate_up";
    case DecodeKernel::ffn_down: return "ffn_down";
    case DecodeKernel::lm_head: return "lm_head";
    }
    return "?";
}

namespace {

// The events and graphs of one profile, destroyed however it ends.
class ProfileRun {
public:
    ProfileRun(FusedDecoder& dec, int slot, int32_t token, int pos, int n_steps)
        : dec_(dec), slot_(slot), token_(token), pos_(pos), n_steps_(n_steps) {}
    ~ProfileRun() {
        for (cudaGraphExec_t e : graphs_) cudaGraphExecDestroy(e);
        for (cudaEvent_t e : events_) cudaEventDestroy(e);
    }
    ProfileRun(const ProfileRun&) = delete;
    ProfileRun& operator=(const ProfileRun&) = delete;

    cudaEvent_t event() {
        cudaEvent_t e = nullptr;
        CUDA_CHECK(cudaEventCreate(&e), "profile_decode events");
        events_.push_back(e);
        return e;
    }
    cudaGraphExec_t graph(const std::function<void()>& body) {
        graphs_.push_back(dec_.record_graph(body, "profile_decode capture"));
        return graphs_.back();
    }
    void start() { dec_.start(slot_, token_, pos_); }
    void sync() { CUDA_CHECK(cudaStreamSynchronize(dec_.stream()), "profile_decode"); }
    double elapsed_us(cudaEvent_t a, cudaEvent_t b) {
        float ms = 0.f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, a, b), "profile_decode");
        return 1000.0 * ms;
    }
    // Microseconds per launch of `exec`: a warm-up, then n_steps launches from the start state.
    double time_graph(cudaGraphExec_t exec, cudaEvent_t t0, cudaEvent_t t1) {
        const cudaStream_t st = dec_.stream();
        start();
        CUDA_CHECK(cudaGraphLaunch(exec, st), "profile_decode");
        start();
        CUDA_CHECK(cudaEventRecord(t0, st), "profile_decode");
        for (int i = 0; i < n_steps_; ++i) CUDA_CHECK(cudaGraphLaunch(exec, st), "profile_decode");
        CUDA_CHECK(cudaEventRecord(t1, st), "profile_decode");
        sync();
        return elapsed_us(t0, t1) / n_steps_;
    }

private:
    FusedDecoder& dec_;
    int slot_;
    int32_t token_;
    int pos_, n_steps_;
    std::vector<cudaEvent_t> events_;
    std::vector<cudaGraphExec_t> graphs_;
};

}  // namespace

DecodeProfile profile_decode_step(FusedDecoder& dec, int slot, int32_t token, int pos, int n_steps) {
    DecodeProfile out;
    ProfileRun run(dec, slot, token, pos, n_steps);
    const cudaStream_t st = dec.stream();
    const int K = dec.kernels_per_step();
    const int clusters = dec.attn_variant(pos + 1);  // the attention variant of pos
    const bool pdl = dec.pdl_on();
    std::vector<cudaEvent_t> ev(size_t(K) + 1);
    for (cudaEvent_t& e : ev) e = run.event();

    // kernel: an event after each kernel (External: inside a capture a plain record only
    // orders streams; this makes event-record nodes)
    std::vector<DecodeKernel> kinds;
    cudaGraphExec_t timed = run.graph([&]() {
        CUDA_CHECK(cudaEventRecordWithFlags(ev[0], st, cudaEventRecordExternal), "profile_decode");
        StepLaunch s;
        s.greedy = true;
        s.attn_clusters = clusters;
        s.after_each = [&](DecodeKernel k) {
            kinds.push_back(k);
            CUDA_CHECK(cudaEventRecordWithFlags(ev[kinds.size()], st, cudaEventRecordExternal), "profile_decode");
        };
        dec.launch_step(s);
    });
    run.start();
    CUDA_CHECK(cudaGraphLaunch(timed, st), "profile_decode");  // warm-up
    run.start();
    for (int i = 0; i < n_steps; ++i) {
        CUDA_CHECK(cudaGraphLaunch(timed, st), "profile_decode");
        run.sync();
        for (size_t k = 0; k < kinds.size(); ++k) out.kernel[kinds[k]] += run.elapsed_us(ev[k], ev[k + 1]) / n_steps;
    }

    // graph_step: the step as the engine runs it
    run.start();
    dec.run(true, pos + 1);  // captures the engine's graph if needed
    run.sync();
    run.start();
    CUDA_CHECK(cudaEventRecord(ev[0], st), "profile_decode");
    for (int i = 0; i < n_steps; ++i) dec.run(true, pos + i + 1);
    CUDA_CHECK(cudaEventRecord(ev[1], st), "profile_decode");
    run.sync();
    out.graph_step = run.elapsed_us(ev[0], ev[1]) / n_steps;
    out.attn_trace = dec.attn_trace();
    out.attn_grid_x = clusters > 0 ? dec.attn_grid_x(clusters) : 0;
    out.attn_trace_fields = cu::kDecAttnTraceFields;

    // the same step with the kernels of `noop_kinds` empty
    auto noop_step = [&](bool with_pdl, unsigned noop_kinds) {
        StepLaunch s;
        s.greedy = true;
        s.attn_clusters = clusters;
        s.pdl = with_pdl;
        s.noop_kinds = noop_kinds;
        return run.time_graph(run.graph([&]() { dec.launch_step(s); }), ev[0], ev[1]);
    };
    const unsigned all = (1u << kDecodeKernelKinds) - 1;
    out.noop_step = noop_step(pdl, all);
    out.noop_step_nopdl = noop_step(false, all);
    for (int k = 0; k < kDecodeKernelKinds; ++k)
        out.marginal[DecodeKernel(k)] = out.graph_step - noop_step(pdl, 1u << k);
    return out;
}

}  // namespace orcd
