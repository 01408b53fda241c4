// fused_decoder.cuh - the fused single-sequence decode step of one engine: its plan
// (the kernels' shapes for the model and GPU), their arguments, the launches (five
// per layer, then the lm_head) and the CUDA graphs the step is replayed from.
//
// The step reads token, position and slot from a device DecState, so its launches
// have fixed arguments and are captured once per variant: logits out or greedy (the
// lm_head writes the argmax token and advances the state), the cluster or the
// global-merge attention (picked per step from the cache length), one step or
// kDecGraphSteps greedy steps.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_common.cuh"
#include "decode.cuh"
#include "engine_weights.cuh"

namespace orcd {

// A piece of the engine's scratch buffer: *dst is set to its start once it is allocated.
struct ScratchSlice {
    void** dst;
    size_t bytes;
};

// The engine's buffers the step reads and writes.
struct DecodeBuffers {
    float* x = nullptr;       // residual stream [n_embd]
    float* q = nullptr;       // roped q [n_head * head_dim]
    float* att = nullptr;     // attention output [n_head * head_dim]
    float* act = nullptr;     // silu(gate) * up [n_ff]
    float* logits = nullptr;  // [n_vocab]
    __half *kc = nullptr, *vc = nullptr;  // K and V pools [layer][pool position][n_head_kv * head_dim]
    size_t layer_stride = 0;              // elements between layers of the pools
    const int64_t* slot_off = nullptr;    // device: slot s's position 0 is slot_off[s] elements into a layer
};

// How FusedDecoder::launch_step launches a step's kernels.
struct StepLaunch {
    bool greedy = false;      // the lm_head writes the argmax token and advances the state (else: logits)
    int attn_clusters = 0;    // the attention variant (FusedDecoder::attn_variant): -1 one block per KV head,
                              // 0 the global merge, else clusters per KV head
    bool pdl = false;         // programmatic dependent launch (layer 0's q/k/v never: see launch_step)
    unsigned noop_kinds = 0;  // bit per DecodeKernel: an empty kernel of the same shape instead (profiling)
    std::function<void(DecodeKernel)> after_each;  // called after each launch (profiling: event records)
};

class FusedDecoder {
public:
    static constexpr int kGraphSteps = 8;  // greedy steps per graph launch (greedy())

    FusedDecoder() = default;
    FusedDecoder(const FusedDecoder&) = delete;
    FusedDecoder& operator=(const FusedDecoder&) = delete;

    // The kernels' shapes for model d (head_dim and head counts already checked) on the
    // GPU `info`; available() says whether they fit, note() why not. Raises the decode
    // kernels' shared-memory limit when they do.
    void plan(const ModelDesc& d, const DeviceInfo& info, int n_ctx);
    bool available() const { return ok_; }
    // Its device buffers (state, counters, greedy tokens, and when available the attention
    // partials, argmax parts and RoPE table) as slices of the engine's scratch.
    void add_scratch(std::vector<ScratchSlice>& slices);
    // Once the scratch is allocated and the weights uploaded: the state zeroed, pinned
    // host buffers, and when available the RoPE table and every kernel's arguments.
    void build(const DeviceWeights& w, const DecodeBuffers& b, cudaStream_t stream);
    void release() noexcept;  // graphs and pinned buffers (the stream is idle)

    // graphs / pdl and the attention variants' fields of `o`; drops the captured graphs.
    void set_options(const CudaOptions& o);
    bool graphs_on() const { return opt_.graphs && graphs_ok_; }
    bool pdl_on() const { return opt_.pdl && pdl_ok_; }
    bool sample_graphs_on() const { return graphs_on() && opt_.sample_graphs; }
    // Why the step or a part of it is off ("" when all is well).
    const std::string& note() const { return note_; }

    // The device state a run starts from (stream-ordered upload).
    void start(int slot, int32_t token, int pos);
    // One step (steps = 1) or kGraphSteps greedy steps whose last cache holds kv_len
    // positions: a graph launch (captured on first use) or plain launches.
    void run(bool greedy, int kv_len, int steps = 1);
    // n_steps greedy steps from (token, pos) of `slot`: out[i] = the token of step i. Syncs.
    void greedy(int slot, int32_t token, int pos, int n_steps, int32_t* out);
    // After a logits step (run(false, ...)) and a device draw of its next token (tok[0], the
    // generator state state_out[0]): that token becomes the next step's input one position on,
    // *row_state the row's generator state for the next draw, and step i's entry of the token
    // buffer the token (copy_tokens). Stream-ordered, no host round trip.
    // i < 0: the state's own step counter (start() zeroes it) picks the entry, so a captured
    // run of steps serves any block.
    void feed_sampled(const int32_t* tok, const uint64_t* state_out, uint64_t* row_state, int i);
    // n_steps sampled steps from the state start() set, each: a logits step, then sample() (the
    // caller's device sampler launches, the same kernels every step, writing tok[0] and
    // state_out[0]), then feed_sampled. With graphs and options' sample_graphs, kGraphSteps of
    // them a graph launch while that many remain (one graph per attention variant and
    // sample_key, which names the sampler's launch choice; captured on first use), then single
    // steps as plain launches; else every step as run(false) and plain launches.
    void sampled(int pos, int n_steps, const std::function<void()>& sample, int sample_key, const int32_t* tok,
                 const uint64_t* state_out, uint64_t* row_state);
    // The first n entries of the token buffer (greedy() and feed_sampled() write it) to out; syncs.
    void copy_tokens(int n, int32_t* out);
    // logits = lm_head(rmsnorm(x_row)) with the fused lm_head (the prompt path's last row).
    void lm_head_last(const float* x_row);

    // For the profiler (decode_profiler.cu):
    // The attention variant of a step whose cache holds kv_len positions: -1 = one block per KV
    // head writing the output (up to options' direct_keys), 0 = the global merge (no Hopper, or
    // beyond cluster_keys), else the clusters per KV head of the cluster variant (1, 2, 4, ...: the
    // fewest, a power of two, holding at most cluster_span positions each, within the caps).
    int attn_variant(int kv_len) const;
    void launch_step(const StepLaunch& s) const;
    // The stream work of `body` as an instantiated graph (a failed capture is cleaned up).
    cudaGraphExec_t record_graph(const std::function<void()>& body, const char* what);
    cudaStream_t stream() const { return stream_; }
    // five a layer (six with gemma3's Q/K norm, which the profiler counts as qkv), the lm_head
    int kernels_per_step() const { return (d_.qk_norm ? 6 : 5) * d_.n_layer + 1; }
    // With options' attn_trace: the cluster attention's timestamps of the steps run since the last
    // call (each step's overwrite the one before; the buffer is zeroed after it is read), per layer
    // trace_layer_records() records of cu::kDecAttnTraceFields (block (x, y) of the launch's grid at
    // record y * grid.x + x; dec_attn_kernel says which fields); empty without.
    std::vector<unsigned long long> attn_trace() const;
    size_t trace_layer_records() const { return size_t(cu::kDecMaxSplits) * size_t(d_.n_head_kv); }
    // The attention's grid.x in a step of `clusters` clusters per KV head (attn_variant > 0).
    int attn_grid_x(int clusters) const { return cluster_blocks() * std::max(1, clusters); }

private:
    struct LayerArgs {
        cu::DecQkvArgs qkv;
        cu::DecQkNormArgs qk_norm;  // gemma3
        cu::DecAttnArgs attention;
        cu::DecProjArgs attn_output, ffn_gate_up, ffn_down;
    };
    struct ProjPlan {
        int rows_per_block = 0;  // 0: a row does not fit the stage
        int smem_w = 0;          // staged weight bytes
    };

    void launch_qkv(const cu::DecQkvArgs& a, bool pdl, const StepLaunch& s) const;
    void launch_qk_norm(const cu::DecQkNormArgs& a, const StepLaunch& s) const;
    void launch_attention(const cu::DecAttnArgs& a, const StepLaunch& s) const;
    void launch_proj(DecodeKernel kind, const cu::DecProjArgs& a, const StepLaunch& s, const char* what) const;
    void launch_lm_head(const StepLaunch& s, int early) const;  // early: its pdl_early
    // one block, the global merge, then 1, 2, 4, 8, 16 clusters (attn_variant's powers of two)
    static constexpr int kAttnVariants = 7;
    cudaGraphExec_t& graph_slot(bool greedy, int steps, int clusters) {
        int v = clusters < 0 ? 0 : clusters == 0 ? 1 : 2;
        for (int c = clusters; c > 1; c >>= 1) ++v;
        return graph_[((steps > 1 ? 2 : 0) + (greedy ? 1 : 0)) * kAttnVariants + v];
    }
    bool capture(bool greedy, int steps, int clusters);  // false: graphs do not work here
    void drop_graphs() noexcept;
    void add_note(const std::string& s);

    ModelDesc d_;
    int n_ctx_ = 0;
    bool hopper_ = false;  // compute capability >= 9.0: PDL and thread-block clusters
    bool ok_ = false, pdl_ok_ = false, graphs_ok_ = true;
    CudaOptions opt_;
    std::string unavailable_, note_;

    // plan
    ProjPlan plan_o_, plan_gu_, plan_d_, plan_lm_;
    int qkv_rows_ = 0, qkv_parts_ = 0, qkv_smem_w_ = 0;
    int lm_blocks_ = 0, lm_grid_ = 0, lm_stages_ = 0;  // lm_head blocks (argmax parts), persistent grid, ring buffers

    // device buffers (slices of the engine's scratch) and pinned host buffers
    cu::DecState* state_ = nullptr;
    cu::DecSync* sync_ = nullptr;
    int32_t* out_tokens_ = nullptr;
    float* part_o_ = nullptr;
    float2* part_ml_ = nullptr;
    cu::DecKvAhead* kv_ahead_ = nullptr;  // per layer: its cache rows for the previous layer's ffn_down (kv_prefetch)
    cu::ArgPart* arg_ = nullptr;
    float2* rope_ = nullptr;  // per RoPE base: [n_ctx][head_dim/2] (cos, sin)
    std::vector<float> rope_bases_;  // the layers' distinct bases, in the order of rope_'s tables
    // gemma3: the residual stream's second buffer and the attention / FFN outputs that wait for
    // their post-norm (DecPend: the next kernel adds them), k before its per-head norm
    float *x_alt_ = nullptr, *o_attn_ = nullptr, *o_ffn_ = nullptr, *k_raw_ = nullptr;
    cu::DecPend lm_pend_{};  // the last layer's FFN output, added by the step's lm_head
    cu::DecState* pinned_state_ = nullptr;
    int32_t* pinned_tokens_ = nullptr;

    cudaStream_t stream_ = nullptr;
    float* logits_ = nullptr;
    std::vector<LayerArgs> layers_;
    cu::DecProjArgs lm_{};
    int max_cluster_ = 8;  // the largest cluster the attention can launch here (16 where non-portable ones fit)
    // the staging attention (options' attn_stage): the most keys a block can stage here, the keys a
    // block stages now (0: off) and the largest cluster of those blocks that fits
    int stage_max_ = 0, stage_ = 0, stage_cluster_ = 0;
    // blocks per cluster of the cluster attention: the options' size within what fits (staging or not)
    int cluster_blocks() const { return std::min(opt_.cluster_size, stage_ > 0 ? stage_cluster_ : max_cluster_); }
    unsigned long long* trace_ = nullptr;  // options' attn_trace: [layer][trace_layer_records()][fields]
    size_t trace_bytes() const;
    cudaGraphExec_t graph_[4 * kAttnVariants] = {};  // graph_slot
    // sampled(): (attention clusters, sample_key) -> kGraphSteps sampled steps
    std::map<std::tuple<int, int>, cudaGraphExec_t> sampled_graphs_;
};

}  // namespace orcd
