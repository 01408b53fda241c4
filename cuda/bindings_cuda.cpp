// bindings_cuda.cpp - the nanobind module orcd._orcd_cuda.
//
//   cuda_status() -> str             "" when a usable GPU is present, else why not
//   device_info(device=0) -> dict
//   CudaEngine(path, n_ctx, n_slots=1, progress=None, device=0)
//       .forward(slot, tokens int32[n], pos0, all_logits=False) -> float32 [n_vocab] | [n, n_vocab]
//       .trace(tokens) -> (list of float32 [n, n_embd] x (n_layer+1), float32 [n, n_vocab])
//       .decode_batch(slots, tokens, pos) -> float32 [n, n_vocab]
//       .decode_greedy(slot, first_token, pos, n_steps) -> int32 [n_steps]   greedy tokens, argmax on the GPU
//       .set_options(fast_decode=None, graphs=None, pdl=None, fused_prompt=None, cluster_keys=None,
//                    split_keys=None, batch_graphs=None, resident_f16=None, sample_split=None, ..., sample_graphs=None) -> paths()
//                                     switches of the fast paths, test hooks (CudaOptions)
//       .options() -> dict   the CudaOptions in force
//       .paths() -> dict   what is in use: fast_decode, graphs, pdl, fused_prompt, *_available, note
//       .profile_decode(slot, token, pos, n_steps=16) -> dict   DecodeProfile: us per step by kernel kind
//                    (keys decode_kernel_kinds), marginal_<kind>, graph_step, noop_step, noop_step_nopdl
//   decode_kernel_kinds: tuple of the fused decode step's kernel kinds, in launch order
//       .info() -> dict (hyperparameters, n_ctx, n_slots, vram_* bytes, device, paths)
//       .close()                          frees the GPU memory now
//   kernel entry points for the tests (NumPy in, NumPy out; see cuda_api.h):
//   dequantize_f16, matvec, gemm, dec_matvec, get_rows, rmsnorm, rope_neox, attention, flash_attention,
//   swiglu, rmsnorm_rows, geglu_tanh, add_bias, swiglu_oai, rope_freqs, attention_sinks,
//   kv_append, qkv_post, rmsnorm_f16, swiglu_f16, f32_to_f16, gemm_f16, dec_qkv, dec_attn, dec_proj
//
// orcd::CudaError (CUDA/cuBLAS failures, not enough GPU memory) becomes
// RuntimeError, other orcd::Error (bad input) ValueError, messages unchanged.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bind_engine.h"
#include "bind_info.h"
#include "bind_step_loop.h"
#include "cuda_api.h"
#include "logprob_kernels.h"
#include "ggml_types.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <class T>
using CArr = nb::ndarray<const T, nb::c_contig, nb::device::cpu>;

// A NumPy array that owns `v`.
template <class T>
nb::ndarray<nb::numpy, T> to_numpy(std::vector<T>&& v, std::vector<size_t> shape) {
    auto* p = new std::vector<T>(std::move(v));
    nb::capsule owner(p, [](void* q) noexcept { delete static_cast<std::vector<T>*>(q); });
    return nb::ndarray<nb::numpy, T>(p->data(), shape.size(), shape.data(), owner);
}

nb::ndarray<nb::numpy> to_numpy_f16(std::vector<uint16_t>&& v, size_t n) {
    auto* p = new std::vector<uint16_t>(std::move(v));
    nb::capsule owner(p, [](void* q) noexcept { delete static_cast<std::vector<uint16_t>*>(q); });
    const size_t shape[1] = {n};
    nb::dlpack::dtype f16{uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
    return nb::ndarray<nb::numpy>(p->data(), 1, shape, owner, nullptr, f16);
}

template <class A>
std::vector<size_t> shape_of(const A& a) {
    std::vector<size_t> s(a.ndim());
    for (size_t i = 0; i < a.ndim(); ++i) s[i] = a.shape(i);
    return s;
}

[[noreturn]] void bad(const std::string& msg) { throw orcd::Error(msg); }

// x as m rows of n_in: [n_in] (m = 1) or [m, n_in].
int rows_of(const CArr<float>& x, int64_t n_in, const char* who) {
    if (x.ndim() == 1 && int64_t(x.shape(0)) == n_in) return 1;
    if (x.ndim() == 2 && int64_t(x.shape(1)) == n_in) return int(x.shape(0));
    bad(std::string(who) + ": x must be [n_in] or [m, n_in] with n_in = " + std::to_string(n_in));
}

const float* opt_f32(const nb::object& o, size_t n, std::vector<float>& keep, const char* who) {
    if (o.is_none()) return nullptr;
    auto a = nb::cast<CArr<float>>(o);
    if (a.size() != n) bad(std::string(who) + ": expected " + std::to_string(n) + " floats, got " +
                           std::to_string(a.size()));
    keep.assign(a.data(), a.data() + n);
    return keep.data();
}

nb::dict paths_dict(const orcd::CudaEngine& e) {
    const orcd::CudaPaths p = e.paths();
    nb::dict r;
    r["fast_decode"] = p.fast_decode;
    r["graphs"] = p.graphs;
    r["pdl"] = p.pdl;
    r["fused_prompt"] = p.fused_prompt;
    r["batch_graphs"] = p.batch_graphs;
    r["batch_graphs_cached"] = p.batch_graphs_cached;
    r["resident_f16"] = p.resident_f16;
    r["resident_f16_bytes"] = p.resident_f16_bytes;
    r["sample_split"] = p.sample_split;
    r["sample_graphs"] = p.sample_graphs;
    r["sample_split_full"] = p.sample_split_full;
    r["fast_decode_available"] = p.fast_decode_available;
    r["pdl_available"] = p.pdl_available;
    r["note"] = p.note;
    return r;
}

nb::dict options_dict(const orcd::CudaOptions& o) {
    nb::dict r;
    r["fast_decode"] = o.fast_decode;
    r["graphs"] = o.graphs;
    r["pdl"] = o.pdl;
    r["fused_prompt"] = o.fused_prompt;
    r["batch_graphs"] = o.batch_graphs;
    r["resident_f16"] = o.resident_f16;
    r["sample_split"] = o.sample_split;
    r["sample_graphs"] = o.sample_graphs;
    r["sample_split_full"] = o.sample_split_full;
    r["cluster_keys"] = o.cluster_keys;
    r["split_keys"] = o.split_keys;
    r["cluster_size"] = o.cluster_size;
    r["cluster_mma"] = o.cluster_mma;
    r["cluster_span"] = o.cluster_span;
    r["direct_keys"] = o.direct_keys;
    r["pdl_early_kinds"] = o.pdl_early_kinds;
    r["pdl_early_kinds_deep"] = o.pdl_early_kinds_deep;
    r["attn_stage"] = o.attn_stage;
    r["lm_bulk"] = o.lm_bulk;
    r["kv_prefetch"] = o.kv_prefetch;
    r["attn_trace"] = o.attn_trace;
    r["vram_limit"] = o.vram_limit;
    return r;
}

nb::dict profile_dict(const orcd::DecodeProfile& p) {
    nb::dict r;
    for (int k = 0; k < orcd::kDecodeKernelKinds; ++k) {
        const auto kind = orcd::DecodeKernel(k);
        r[orcd::decode_kernel_name(kind)] = p.kernel[kind];
    }
    r["graph_step"] = p.graph_step;
    r["noop_step"] = p.noop_step;
    r["noop_step_nopdl"] = p.noop_step_nopdl;
    for (int k = 0; k < orcd::kDecodeKernelKinds; ++k) {
        const auto kind = orcd::DecodeKernel(k);
        r[(std::string("marginal_") + orcd::decode_kernel_name(kind)).c_str()] = p.marginal[kind];
    }
    if (!p.attn_trace.empty()) {
        nb::list t;
        for (unsigned long long v : p.attn_trace) t.append(v);
        r["attn_trace"] = t;
        r["attn_grid_x"] = p.attn_grid_x;
        r["attn_trace_fields"] = p.attn_trace_fields;
    }
    return r;
}

nb::dict engine_info(const orcd::CudaEngine& e) {
    nb::dict r = orcd::engine_info_dict(e, "cuda");
    r["prompt_chunk"] = e.max_prompt_chunk();
    const orcd::CudaMemoryUse m = e.memory_use();
    r["vram_weights"] = m.weights;
    r["vram_kv"] = m.kv;
    r["vram_scratch"] = m.scratch;
    r["vram_resident_f16"] = m.resident_f16;
    r["vram_bytes"] = m.total();
    r["device"] = e.device().name;
    r["device_name"] = e.device().name;
    r["device_index"] = e.device().device;
    r["paths"] = paths_dict(e);
    return r;
}

// The engine and its lock (calls are serialised: its KV cache, graphs and stream
// serve one caller at a time); the methods every engine has: bind_engine.h.
using PyCudaEngine = orcd::EngineHolder<orcd::CudaEngine>;

std::vector<int32_t> ints(const CArr<int32_t>& a, const char* who) {
    if (a.ndim() != 1) bad(std::string(who) + " must be a 1-D int32 array");
    return std::vector<int32_t>(a.data(), a.data() + a.shape(0));
}

}  // namespace

NB_MODULE(_orcd_cuda, m) {
    m.doc() = "orcd CUDA backend: CudaEngine and kernel entry points for tests";

    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const orcd::CudaError& e) {
            PyErr_SetString(PyExc_RuntimeError, e.what());
        } catch (const orcd::Error& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });

    {
        nb::list kinds;
        for (int k = 0; k < orcd::kDecodeKernelKinds; ++k) kinds.append(orcd::decode_kernel_name(orcd::DecodeKernel(k)));
        m.attr("decode_kernel_kinds") = nb::tuple(kinds);
    }

    m.def("cuda_status", &orcd::cuda_status,
          "'' when a usable CUDA GPU is present, else the reason (no driver, no device, no kernel image).");

    m.def(
        "device_info",
        [](int device) {
            const orcd::DeviceInfo d = orcd::device_info(device);
            nb::dict r;
            r["device"] = d.device;
            r["name"] = d.name;
            r["compute_capability"] = std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor);
            r["sm_count"] = d.sm_count;
            r["total_memory"] = d.total_mem;
            r["free_memory"] = d.free_mem;
            r["l2_bytes"] = d.l2_bytes;
            r["driver_version"] = d.driver_version;
            r["runtime_version"] = d.runtime_version;
            return r;
        },
        "device"_a = 0);

    nb::class_<PyCudaEngine> cuda_engine(m, "CudaEngine");
    orcd::bind_engine_methods<orcd::CudaEngine>(cuda_engine, engine_info);
    cuda_engine
        .def(
            "__init__",
            [](PyCudaEngine* self, const std::string& path, int n_ctx, int n_slots, nb::object progress,
               int device, size_t kv_memory) {
                orcd::ProgressFn fn;
                if (!progress.is_none()) {
                    fn = [progress](uint64_t done, uint64_t total) { progress(done, total); };
                }
                auto file = std::make_shared<orcd::GGUFFile>(path);
                new (self) PyCudaEngine{orcd::make_cuda_engine(file, n_ctx, n_slots, fn, device, kv_memory)};
            },
            "path"_a, "n_ctx"_a, "n_slots"_a = 1, "progress"_a = nb::none(), "device"_a = 0, "kv_memory"_a = 0)
        .def(
            "set_options",
            [](PyCudaEngine& self, nb::object fast_decode, nb::object graphs, nb::object pdl,
               nb::object fused_prompt, nb::object cluster_keys, nb::object split_keys, nb::object batch_graphs,
               nb::object resident_f16, nb::object sample_split, nb::object cluster_size, nb::object cluster_mma,
               nb::object cluster_span, nb::object direct_keys, nb::object sample_graphs,
               nb::object sample_split_full, nb::object pdl_early_kinds, nb::object pdl_early_kinds_deep,
               nb::object attn_stage, nb::object attn_trace, nb::object lm_bulk, nb::object kv_prefetch) {
                orcd::CudaEngine& e = self.get();
                orcd::CudaOptions o = e.options();
                if (!fast_decode.is_none()) o.fast_decode = nb::cast<bool>(fast_decode);
                if (!graphs.is_none()) o.graphs = nb::cast<bool>(graphs);
                if (!pdl.is_none()) o.pdl = nb::cast<bool>(pdl);
                if (!fused_prompt.is_none()) o.fused_prompt = nb::cast<bool>(fused_prompt);
                if (!cluster_keys.is_none()) o.cluster_keys = nb::cast<int>(cluster_keys);
                if (!split_keys.is_none()) o.split_keys = nb::cast<int>(split_keys);
                if (!batch_graphs.is_none()) o.batch_graphs = nb::cast<bool>(batch_graphs);
                if (!resident_f16.is_none()) o.resident_f16 = nb::cast<bool>(resident_f16);
                if (!sample_split.is_none()) o.sample_split = nb::cast<bool>(sample_split);
                if (!cluster_size.is_none()) o.cluster_size = nb::cast<int>(cluster_size);
                if (!cluster_mma.is_none()) o.cluster_mma = nb::cast<bool>(cluster_mma);
                if (!cluster_span.is_none()) o.cluster_span = nb::cast<int>(cluster_span);
                if (!direct_keys.is_none()) o.direct_keys = nb::cast<int>(direct_keys);
                if (!sample_graphs.is_none()) o.sample_graphs = nb::cast<bool>(sample_graphs);
                if (!sample_split_full.is_none()) o.sample_split_full = nb::cast<bool>(sample_split_full);
                if (!pdl_early_kinds.is_none()) o.pdl_early_kinds = nb::cast<int>(pdl_early_kinds);
                if (!pdl_early_kinds_deep.is_none()) o.pdl_early_kinds_deep = nb::cast<int>(pdl_early_kinds_deep);
                if (!attn_stage.is_none()) o.attn_stage = nb::cast<int>(attn_stage);
                if (!attn_trace.is_none()) o.attn_trace = nb::cast<bool>(attn_trace);
                if (!lm_bulk.is_none()) o.lm_bulk = nb::cast<bool>(lm_bulk);
                if (!kv_prefetch.is_none()) o.kv_prefetch = nb::cast<int>(kv_prefetch);
                {
                    nb::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(*self.mu);
                    e.set_options(o);
                }
                return paths_dict(e);
            },
            "fast_decode"_a = nb::none(), "graphs"_a = nb::none(), "pdl"_a = nb::none(),
            "fused_prompt"_a = nb::none(), "cluster_keys"_a = nb::none(), "split_keys"_a = nb::none(),
            "batch_graphs"_a = nb::none(), "resident_f16"_a = nb::none(), "sample_split"_a = nb::none(),
            "cluster_size"_a = nb::none(), "cluster_mma"_a = nb::none(), "cluster_span"_a = nb::none(),
            "direct_keys"_a = nb::none(), "sample_graphs"_a = nb::none(), "sample_split_full"_a = nb::none(),
            "pdl_early_kinds"_a = nb::none(), "pdl_early_kinds_deep"_a = nb::none(), "attn_stage"_a = nb::none(),
            "attn_trace"_a = nb::none(), "lm_bulk"_a = nb::none(), "kv_prefetch"_a = nb::none(),
            "Turn fast paths on/off and set the decode attention's test hooks (None leaves one as is); "
            "returns paths().")
        .def("options", [](PyCudaEngine& self) { return options_dict(self.get().options()); })
        .def(
            "profile_decode",
            [](PyCudaEngine& self, int slot, int32_t token, int pos, int n_steps) {
                orcd::DecodeProfile p;
                {
                    nb::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(*self.mu);
                    p = self.get().profile_decode(slot, token, pos, n_steps);
                }
                return profile_dict(p);
            },
            "slot"_a, "token"_a, "pos"_a, "n_steps"_a = 16,
            "Microseconds per decode step: each kernel kind (events around each kernel, no PDL), "
            "marginal_<kind> (its cost in the graph + PDL pipeline), 'graph_step' (the step as the engine "
            "runs it), 'noop_step' / 'noop_step_nopdl' (empty kernels of the same shapes).")
        .def("paths", [](PyCudaEngine& self) { return paths_dict(self.get()); })
        .def_prop_ro("n_ctx", [](PyCudaEngine& self) { return self.get().n_ctx(); })
        .def_prop_ro("n_slots", [](PyCudaEngine& self) { return self.get().n_slots(); })
        .def_prop_ro("n_vocab", [](PyCudaEngine& self) { return self.get().desc().n_vocab; });

    // ---------------------------------------------------------------- kernel entry points
    m.def(
        "dequantize_f16",
        [](uint32_t type, CArr<uint8_t> data, int64_t n) {
            std::vector<uint16_t> r = orcd::cuda_test::dequantize_f16(type, data.data(), data.size(), n);
            return to_numpy_f16(std::move(r), size_t(n));
        },
        "type_id"_a, "data"_a, "n"_a, "GGUF bytes of n elements -> float16[n] (the GPU dequantization kernel).");

    m.def(
        "matvec",
        [](uint32_t type, CArr<uint8_t> w, int64_t n_in, int64_t n_out, CArr<float> x, nb::object bias,
           nb::object y) {
            const int rows = rows_of(x, n_in, "matvec");
            std::vector<float> kb, ky;
            const float* b = opt_f32(bias, size_t(n_out), kb, "matvec bias");
            const float* yi = opt_f32(y, size_t(rows) * n_out, ky, "matvec y");
            auto r = orcd::cuda_test::matvec(type, w.data(), w.size(), n_in, n_out, x.data(), rows, b, yi);
            return to_numpy(std::move(r), {size_t(rows), size_t(n_out)});
        },
        "type_id"_a, "w"_a, "n_in"_a, "n_out"_a, "x"_a, "bias"_a = nb::none(), "y"_a = nb::none(),
        "[m, n_out] = x[m, n_in] · Wᵀ (+ bias) (+ y) with the quantized mat-vec kernel (m <= 8).");

    m.def(
        "gemm",
        [](uint32_t type, CArr<uint8_t> w, int64_t n_in, int64_t n_out, CArr<float> x, nb::object bias, nb::object y,
           int64_t chunk_rows) {
            const int rows = rows_of(x, n_in, "gemm");
            std::vector<float> kb, ky;
            const float* b = opt_f32(bias, size_t(n_out), kb, "gemm bias");
            const float* yi = opt_f32(y, size_t(rows) * n_out, ky, "gemm y");
            auto r = orcd::cuda_test::gemm(type, w.data(), w.size(), n_in, n_out, x.data(), rows, b, yi, chunk_rows);
            return to_numpy(std::move(r), {size_t(rows), size_t(n_out)});
        },
        "type_id"_a, "w"_a, "n_in"_a, "n_out"_a, "x"_a, "bias"_a = nb::none(), "y"_a = nb::none(),
        "chunk_rows"_a = 0, "The prompt-path product: W dequantized to fp16 (chunks of chunk_rows rows) + cublasGemmEx.");

    m.def(
        "dec_matvec",
        [](uint32_t type, CArr<uint8_t> w, int64_t n_in, int64_t n_out, CArr<float> x, nb::object norm_w,
           float eps, bool bulk) {
            if (x.ndim() != 1 || int64_t(x.shape(0)) != n_in) bad("dec_matvec: x must be [n_in]");
            std::vector<float> kn;
            const float* nw = opt_f32(norm_w, size_t(n_in), kn, "dec_matvec norm_w");
            int32_t arg = -1;
            auto r = orcd::cuda_test::dec_matvec(type, w.data(), w.size(), n_in, n_out, x.data(), nw, eps, &arg, bulk);
            return nb::make_tuple(to_numpy(std::move(r), {size_t(n_out)}), arg);
        },
        "type_id"_a, "w"_a, "n_in"_a, "n_out"_a, "x"_a, "norm_w"_a = nb::none(), "eps"_a = 1e-6f, "bulk"_a = false,
        "(y[n_out], argmax) = W · rmsnorm(x) through the fused decode mat-vec (int8 activations for "
        "Q4_0/Q5_0/Q8_0/Q4_K/Q6_K) and its device-side argmax (bulk: the lm_head's bulk-copy instance).");

    m.def(
        "get_rows",
        [](uint32_t type, CArr<uint8_t> w, int64_t n_in, int64_t n_rows, CArr<int32_t> ids) {
            const std::vector<int32_t> id = ints(ids, "ids");
            auto r = orcd::cuda_test::get_rows(type, w.data(), w.size(), n_in, n_rows, id.data(), int(id.size()));
            return to_numpy(std::move(r), {id.size(), size_t(n_in)});
        },
        "type_id"_a, "w"_a, "n_in"_a, "n_rows"_a, "ids"_a);

    m.def(
        "rmsnorm",
        [](CArr<float> x, CArr<float> w, float eps) {
            if (x.ndim() != 2 || w.ndim() != 1 || w.shape(0) != x.shape(1))
                bad("rmsnorm: x must be [rows, n] and w [n]");
            auto r = orcd::cuda_test::rmsnorm(x.data(), int64_t(x.shape(0)), int64_t(x.shape(1)), w.data(), eps);
            return to_numpy(std::move(r), {x.shape(0), x.shape(1)});
        },
        "x"_a, "w"_a, "eps"_a);

    m.def(
        "rope_neox",
        [](CArr<float> x, CArr<int32_t> pos, float base) {
            if (x.ndim() != 3 || pos.ndim() != 1 || pos.shape(0) != x.shape(0))
                bad("rope: x must be [n_tok, n_heads, head_dim] and pos [n_tok]");
            auto r = orcd::cuda_test::rope_neox(x.data(), int(x.shape(0)), int(x.shape(1)), int(x.shape(2)), pos.data(),
                                           base);
            return to_numpy(std::move(r), {x.shape(0), x.shape(1), x.shape(2)});
        },
        "x"_a, "pos"_a, "base"_a);

    m.def(
        "attention",
        [](CArr<float> q, CArr<float> k, CArr<float> v, CArr<int32_t> pos, int split_len) {
            if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3 || shape_of(k) != shape_of(v) ||
                q.shape(2) != k.shape(2) || pos.ndim() != 1 || pos.shape(0) != q.shape(0))
                bad("attention: q [n_q, n_head, hd], k and v [n_kv, n_head_kv, hd], pos [n_q]");
            auto r = orcd::cuda_test::attention(q.data(), int(q.shape(0)), int(q.shape(1)), k.data(), v.data(),
                                                int(k.shape(0)), int(k.shape(1)), int(q.shape(2)), pos.data(),
                                                split_len);
            return to_numpy(std::move(r), {q.shape(0), q.shape(1), q.shape(2)});
        },
        "q"_a, "k"_a, "v"_a, "pos"_a, "split_len"_a = 0,
        "Query t attends to positions [0, pos[t]] of k/v after they pass through the fp16 KV-cache store kernel.");

    m.def(
        "flash_attention",
        [](CArr<float> q, CArr<float> k, CArr<float> v, CArr<int32_t> pos, bool routed, int split_len) {
            if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3 || shape_of(k) != shape_of(v) ||
                q.shape(2) != k.shape(2) || pos.ndim() != 1 || pos.shape(0) != q.shape(0))
                bad("flash_attention: q [n_q, n_head, hd], k and v [n_kv, n_head_kv, hd], pos [n_q]");
            auto r = orcd::cuda_test::flash_attention(q.data(), int(q.shape(0)), int(q.shape(1)), k.data(),
                                                      v.data(), int(k.shape(0)), int(k.shape(1)), int(q.shape(2)),
                                                      pos.data(), routed, split_len);
            return to_numpy(std::move(r), {q.shape(0), q.shape(1), q.shape(2)});
        },
        "q"_a, "k"_a, "v"_a, "pos"_a, "routed"_a = false, "split_len"_a = 0,
        "The prompt attention with the keys in slot 1 of 3 (others NaN): routed=True as the engine picks "
        "for a one-slot launch, else the tensor-core kernel in split_len-key splits (0: one).");

    m.def(
        "swiglu",
        [](CArr<float> g, CArr<float> u) {
            if (g.size() != u.size()) bad("swiglu: g and u differ in size");
            auto r = orcd::cuda_test::swiglu(g.data(), u.data(), int64_t(g.size()));
            return to_numpy(std::move(r), shape_of(g));
        },
        "g"_a, "u"_a);

    m.def(
        "rmsnorm_rows",
        [](CArr<float> x, CArr<float> w, float eps) {
            if (x.ndim() != 2 || w.ndim() != 1 || w.shape(0) != x.shape(1))
                bad("rmsnorm_rows: x must be [rows, n] and w [n]");
            auto r = orcd::cuda_test::rmsnorm_rows(x.data(), int64_t(x.shape(0)), int64_t(x.shape(1)), w.data(), eps);
            return to_numpy(std::move(r), {x.shape(0), x.shape(1)});
        },
        "x"_a, "w"_a, "eps"_a);

    m.def(
        "geglu_tanh",
        [](CArr<float> g, CArr<float> u) {
            if (g.size() != u.size()) bad("geglu_tanh: g and u differ in size");
            auto r = orcd::cuda_test::geglu_tanh(g.data(), u.data(), int64_t(g.size()));
            return to_numpy(std::move(r), shape_of(g));
        },
        "g"_a, "u"_a);

    m.def(
        "swiglu_oai",
        [](CArr<float> g, CArr<float> u, float alpha, float limit) {
            if (g.size() != u.size()) bad("swiglu_oai: g and u differ in size");
            auto r = orcd::cuda_test::swiglu_oai(g.data(), u.data(), int64_t(g.size()), alpha, limit);
            return to_numpy(std::move(r), shape_of(g));
        },
        "g"_a, "u"_a, "alpha"_a = 1.702f, "limit"_a = 7.0f);

    m.def(
        "rope_freqs",
        [](CArr<float> x, CArr<int32_t> pos, CArr<double> inv_freq, float mscale, bool neox) {
            if (x.ndim() != 3 || pos.ndim() != 1 || pos.shape(0) != x.shape(0) || inv_freq.ndim() != 1 ||
                inv_freq.shape(0) * 2 != x.shape(2))
                bad("rope_freqs: x [n_tok, n_heads, hd], pos [n_tok], inv_freq [hd / 2]");
            auto r = orcd::cuda_test::rope_freqs(x.data(), int(x.shape(0)), int(x.shape(1)), int(x.shape(2)),
                                                 pos.data(), inv_freq.data(), mscale, neox);
            return to_numpy(std::move(r), {x.shape(0), x.shape(1), x.shape(2)});
        },
        "x"_a, "pos"_a, "inv_freq"_a, "mscale"_a = 1.0f, "neox"_a = true);

    m.def(
        "attention_sinks",
        [](CArr<float> q, CArr<float> k, CArr<float> v, CArr<int32_t> pos, int window, nb::object sinks_obj) {
            if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3 || shape_of(k) != shape_of(v) ||
                q.shape(2) != k.shape(2) || pos.ndim() != 1 || pos.shape(0) != q.shape(0))
                bad("attention_sinks: q [n_q, n_head, hd], k and v [n_kv, n_head_kv, hd], pos [n_q]");
            const float* sinks = nullptr;
            CArr<float> sk;
            if (!sinks_obj.is_none()) {
                sk = nb::cast<CArr<float>>(sinks_obj);
                if (sk.ndim() != 1 || sk.shape(0) != q.shape(1)) bad("attention_sinks: sinks must be [n_head]");
                sinks = sk.data();
            }
            auto r = orcd::cuda_test::attention_sinks(q.data(), int(q.shape(0)), int(q.shape(1)), k.data(), v.data(),
                                                      int(k.shape(0)), int(k.shape(1)), int(q.shape(2)), pos.data(),
                                                      window, sinks);
            return to_numpy(std::move(r), {q.shape(0), q.shape(1), q.shape(2)});
        },
        "q"_a, "k"_a, "v"_a, "pos"_a, "window"_a = 0, "sinks"_a = nb::none(),
        "gpt-oss's attention: query t attends to positions (pos[t] - window, pos[t]] (window 0: all) with head "
        "h's sink logit sinks[h] in each softmax (None: no sinks).");

    m.def(
        "add_bias",
        [](CArr<float> x, CArr<float> b) {
            if (x.ndim() != 2 || b.ndim() != 1 || b.shape(0) != x.shape(1)) bad("add_bias: x [rows, n], b [n]");
            auto r = orcd::cuda_test::add_bias(x.data(), int64_t(x.shape(0)), int64_t(x.shape(1)), b.data());
            return to_numpy(std::move(r), {x.shape(0), x.shape(1)});
        },
        "x"_a, "b"_a);

    // ---------------------------------------------------------------- fused prompt kernels, the decode step
    // (named as their CPU twins, orcd._orcd.cpu_ops_<name>, where there is one)
    {
        auto f16 = [](std::vector<uint16_t>&& v, std::vector<size_t> shape) {
            auto* p = new std::vector<uint16_t>(std::move(v));
            nb::capsule owner(p, [](void* q) noexcept { delete static_cast<std::vector<uint16_t>*>(q); });
            nb::dlpack::dtype dt{uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
            return nb::ndarray<nb::numpy>(p->data(), shape.size(), shape.data(), owner, nullptr, dt);
        };
        auto need = [](bool ok, const char* msg) {
            if (!ok) bad(msg);
        };
        auto weight = [](uint32_t type, const CArr<uint8_t>& w, int64_t n_in, int64_t n_out) {
            return orcd::cuda_test::HostWeight{type, w.data(), w.size(), n_in, n_out};
        };

        m.def(
            "kv_append",
            [need](CArr<float> k, CArr<float> v, CArr<int32_t> slots, CArr<int32_t> pos, int n_slots, int n_ctx) {
                need(k.ndim() == 3 && shape_of(k) == shape_of(v) && slots.ndim() == 1 && pos.ndim() == 1 &&
                         slots.shape(0) == k.shape(0) && pos.shape(0) == k.shape(0),
                     "kv_append: k and v [n, n_head_kv, head_dim], slots and pos [n]");
                const int kd = int(k.shape(1) * k.shape(2));
                auto r = orcd::cuda_test::kv_append(k.data(), v.data(), int(k.shape(0)), kd, slots.data(), pos.data(),
                                                    n_slots, n_ctx);
                const std::vector<size_t> sh = {size_t(n_slots), size_t(n_ctx), k.shape(1), k.shape(2)};
                return nb::make_tuple(to_numpy(std::move(r.first), sh), to_numpy(std::move(r.second), sh));
            },
            "k"_a, "v"_a, "slots"_a, "pos"_a, "n_slots"_a, "n_ctx"_a,
            "(K cache, V cache) [n_slots, n_ctx, n_head_kv, head_dim] after the KV-store kernel (NaN where unwritten).");

        m.def(
            "qkv_post",
            [need](CArr<float> qkv, int n_head, int n_head_kv, int head_dim, CArr<int32_t> pos, CArr<int32_t> slots,
                   float base, int n_slots, int n_ctx, nb::object bq, nb::object bk, nb::object bv) {
                const size_t qd = size_t(n_head) * head_dim, kd = size_t(n_head_kv) * head_dim;
                need(qkv.ndim() == 2 && qkv.shape(1) == qd + 2 * kd && pos.ndim() == 1 && slots.ndim() == 1 &&
                         pos.shape(0) == qkv.shape(0) && slots.shape(0) == qkv.shape(0),
                     "qkv_post: qkv [n, (n_head + 2*n_head_kv)*head_dim], pos and slots [n]");
                std::vector<float> k1, k2, k3, kc, vc;
                const float* b0 = opt_f32(bq, qd, k1, "qkv_post bq");
                const float* b1 = opt_f32(bk, kd, k2, "qkv_post bk");
                const float* b2 = opt_f32(bv, kd, k3, "qkv_post bv");
                auto r = orcd::cuda_test::qkv_post(qkv.data(), int(qkv.shape(0)), n_head, n_head_kv, head_dim, b0, b1,
                                                   b2, pos.data(), slots.data(), base, n_slots, n_ctx, &kc, &vc);
                const std::vector<size_t> cs = {size_t(n_slots), size_t(n_ctx), kd};
                return nb::make_tuple(to_numpy(std::move(r), {qkv.shape(0), qkv.shape(1)}),
                                      to_numpy(std::move(kc), cs), to_numpy(std::move(vc), cs));
            },
            "qkv"_a, "n_head"_a, "n_head_kv"_a, "head_dim"_a, "pos"_a, "slots"_a, "base"_a, "n_slots"_a, "n_ctx"_a,
            "bq"_a = nb::none(), "bk"_a = nb::none(), "bv"_a = nb::none(),
            "(qkv rows after the kernel, K cache, V cache [n_slots, n_ctx, kv_dim]): bias + NEOX RoPE + KV append.");

        m.def(
            "rmsnorm_f16",
            [f16, need](CArr<float> x, CArr<float> w, float eps) {
                need(x.ndim() == 2 && w.ndim() == 1 && w.shape(0) == x.shape(1), "rmsnorm_f16: x [rows, n], w [n]");
                auto r = orcd::cuda_test::rmsnorm_f16(x.data(), int64_t(x.shape(0)), int64_t(x.shape(1)), w.data(), eps);
                return f16(std::move(r), {x.shape(0), x.shape(1)});
            },
            "x"_a, "w"_a, "eps"_a, "float16 [rows, n] = fp16(rmsnorm(x) * w).");

        m.def(
            "swiglu_f16",
            [f16, need](CArr<float> gu) {
                need(gu.ndim() == 2 && gu.shape(1) % 2 == 0, "swiglu_f16: gu [rows, 2n]");
                const int n = int(gu.shape(1) / 2);
                auto r = orcd::cuda_test::swiglu_f16(gu.data(), int(gu.shape(0)), n);
                return f16(std::move(r), {gu.shape(0), size_t(n)});
            },
            "gu"_a, "float16 [rows, n] = fp16(silu(gu[:, :n]) * gu[:, n:]).");

        m.def(
            "f32_to_f16",
            [f16](CArr<float> x) {
                auto r = orcd::cuda_test::f32_to_f16(x.data(), int64_t(x.size()));
                return f16(std::move(r), shape_of(x));
            },
            "x"_a, "float16 of x (round to nearest even).");

        m.def(
            "gemm_f16",
            [need](CArr<uint16_t> a16, CArr<uint16_t> x16, nb::object y) {
                need(a16.ndim() == 2 && x16.ndim() == 2 && a16.shape(1) == x16.shape(1),
                     "gemm_f16: a16 [n_out, n_in] and x16 [rows, n_in] (float16 bits as uint16)");
                const size_t rows = x16.shape(0), n_out = a16.shape(0);
                std::vector<float> ky;
                const float* yi = opt_f32(y, rows * n_out, ky, "gemm_f16 y");
                auto r = orcd::cuda_test::gemm_f16(a16.data(), int(a16.shape(1)), int(n_out), x16.data(), int(rows), yi);
                return to_numpy(std::move(r), {rows, n_out});
            },
            "a16"_a, "x16"_a, "y"_a = nb::none(),
            "float32 [rows, n_out] (+)= x16 · a16ᵀ through cublasGemmEx (fp16 in, fp32 accumulate); "
            "a16, x16 as uint16 views of float16 arrays.");

        m.def(
            "dec_qkv",
            [need, weight](uint32_t type_q, CArr<uint8_t> wq, uint32_t type_k, CArr<uint8_t> wk, uint32_t type_v,
                           CArr<uint8_t> wv, int n_embd, int n_head, int n_head_kv, int head_dim, CArr<float> norm_w,
                           float eps, float base, int pos, int slot, int n_slots, int n_ctx, nb::object x,
                           nb::object bq, nb::object bk, nb::object bv, uint32_t emb_type, nb::object emb,
                           int64_t n_vocab, int32_t token, int rows_per_part) {
                need(norm_w.size() == size_t(n_embd), "dec_qkv: norm_w must have n_embd floats");
                const int64_t qd = int64_t(n_head) * head_dim, kd = int64_t(n_head_kv) * head_dim;
                const orcd::cuda_test::HostWeight w[3] = {weight(type_q, wq, n_embd, qd), weight(type_k, wk, n_embd, kd),
                                                          weight(type_v, wv, n_embd, kd)};
                std::vector<float> kx, k1, k2, k3;
                const float* xp = opt_f32(x, size_t(n_embd), kx, "dec_qkv x");
                const float* b[3] = {opt_f32(bq, size_t(qd), k1, "dec_qkv bq"), opt_f32(bk, size_t(kd), k2, "dec_qkv bk"),
                                     opt_f32(bv, size_t(kd), k3, "dec_qkv bv")};
                orcd::cuda_test::HostWeight e{};
                CArr<uint8_t> eb;
                if (!emb.is_none()) {
                    eb = nb::cast<CArr<uint8_t>>(emb);
                    e = weight(emb_type, eb, n_embd, n_vocab);
                }
                auto r = orcd::cuda_test::dec_qkv(w, b, xp, emb.is_none() ? nullptr : &e, token, norm_w.data(), eps,
                                                  n_head, n_head_kv, head_dim, base, pos, slot, n_slots, n_ctx,
                                                  rows_per_part);
                const std::vector<size_t> cs = {size_t(n_slots), size_t(n_ctx), size_t(kd)};
                nb::object xo = nb::none();
                if (!r.x.empty()) xo = nb::cast(to_numpy(std::move(r.x), {size_t(n_embd)}));
                return nb::make_tuple(to_numpy(std::move(r.q), {size_t(qd)}), to_numpy(std::move(r.kc), cs),
                                      to_numpy(std::move(r.vc), cs), xo);
            },
            "type_q"_a, "wq"_a, "type_k"_a, "wk"_a, "type_v"_a, "wv"_a, "n_embd"_a, "n_head"_a, "n_head_kv"_a,
            "head_dim"_a, "norm_w"_a, "eps"_a, "base"_a, "pos"_a, "slot"_a, "n_slots"_a, "n_ctx"_a,
            "x"_a = nb::none(), "bq"_a = nb::none(), "bk"_a = nb::none(), "bv"_a = nb::none(), "emb_type"_a = 0,
            "emb"_a = nb::none(), "n_vocab"_a = 0, "token"_a = 0, "rows_per_part"_a = 0,
            "(q [n_head*head_dim], K cache, V cache [n_slots, n_ctx, kv_dim], embedding row or None) of the fused "
            "q/k/v kernel on x (or the embedding row of `token` of emb [n_vocab, n_embd]).");

        m.def(
            "dec_attn",
            [need](CArr<float> q, CArr<float> k, CArr<float> v, bool cluster, int max_splits, int split_keys,
                   int cluster_size, bool cluster_mma, int clusters, int stage) {
                need(q.ndim() == 2 && k.ndim() == 3 && shape_of(k) == shape_of(v) && q.shape(1) == k.shape(2),
                     "dec_attn: q [n_head, head_dim], k and v [n_kv, n_head_kv, head_dim]");
                auto r = orcd::cuda_test::dec_attn(q.data(), int(q.shape(0)), k.data(), v.data(), int(k.shape(0)),
                                                   int(k.shape(1)), int(q.shape(1)), cluster ? cluster_size : 0,
                                                   max_splits, split_keys, cluster_mma, clusters, stage);
                return nb::make_tuple(to_numpy(std::move(r.first), shape_of(q)), to_numpy(std::move(r.second), shape_of(q)));
            },
            "q"_a, "k"_a, "v"_a, "cluster"_a, "max_splits"_a = 32, "split_keys"_a = 32, "cluster_size"_a = 8,
            "cluster_mma"_a = false, "clusters"_a = 1, "stage"_a = 0,
            "(out, out of a second launch) [n_head, head_dim]: the decode attention of one query at position n_kv-1.");

        m.def(
            "dec_attn_time",
            [](int n_head, int n_head_kv, int head_dim, int n_kv, int cluster, int max_splits, int split_keys,
               bool cluster_mma, int layers, int iters, int clusters, int stage) {
                nb::gil_scoped_release nogil;
                return orcd::cuda_test::dec_attn_time(n_head, n_head_kv, head_dim, n_kv, cluster, max_splits,
                                                      split_keys, cluster_mma, layers, iters, clusters, stage);
            },
            "n_head"_a, "n_head_kv"_a, "head_dim"_a, "n_kv"_a, "cluster"_a = 0, "max_splits"_a = 64,
            "split_keys"_a = 32, "cluster_mma"_a = false, "layers"_a = 24, "iters"_a = 20, "clusters"_a = 1,
            "stage"_a = 0,
            "Microseconds per decode-attention launch at n_kv positions (cluster: blocks per KV head of the "
            "cluster variant, 0: the global merge; cuda/cuda_api.h).");

        m.def(
            "dec_proj",
            [need, weight](int mode, uint32_t type0, CArr<uint8_t> w0, int64_t n_in, int64_t n_out, CArr<float> act,
                           nb::object y, uint32_t type1, nb::object w1, nb::object norm_w, float eps,
                           int rows_per_block) {
                need(act.size() == size_t(n_in), "dec_proj: act must have n_in floats");
                std::vector<float> ky, kn;
                const float* yi = opt_f32(y, size_t(n_out), ky, "dec_proj y");
                const float* nw = opt_f32(norm_w, size_t(n_in), kn, "dec_proj norm_w");
                const orcd::cuda_test::HostWeight h0 = weight(type0, w0, n_in, n_out);
                orcd::cuda_test::HostWeight h1{};
                CArr<uint8_t> b1;
                if (!w1.is_none()) {
                    b1 = nb::cast<CArr<uint8_t>>(w1);
                    h1 = weight(type1, b1, n_in, n_out);
                }
                auto r = orcd::cuda_test::dec_proj(mode, h0, w1.is_none() ? nullptr : &h1, act.data(), nw, eps, yi,
                                                   rows_per_block);
                return to_numpy(std::move(r), {size_t(n_out)});
            },
            "mode"_a, "type0"_a, "w0"_a, "n_in"_a, "n_out"_a, "act"_a, "y"_a = nb::none(), "type1"_a = 0,
            "w1"_a = nb::none(), "norm_w"_a = nb::none(), "eps"_a = 1e-6f, "rows_per_block"_a = 8,
            "y [n_out] of the fused decode projection: mode 0 (RESID) y + W0·act, mode 1 (GLU) "
            "silu(W0·h) * (W1·h), h = rmsnorm(act) * norm_w.");
    }

    // ---- GPU sampling against its CPU twin (orcd._orcd.Sampler)
    using HistArrays = std::vector<nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>>;
    auto sample_params = [](const std::vector<nb::tuple>& params, const char* fn) {
        std::vector<orcd::SamplerParams> ps;
        for (const nb::tuple& t : params) {
            if (t.size() != 8) throw orcd::Error(std::string(fn) + ": params are (temperature, top_k, top_p, min_p, "
                                                 "repetition_penalty, presence_penalty, frequency_penalty, penalty_last_n)");
            orcd::SamplerParams p;
            p.temperature = nb::cast<float>(t[0]);
            p.top_k = nb::cast<int>(t[1]);
            p.top_p = nb::cast<float>(t[2]);
            p.min_p = nb::cast<float>(t[3]);
            p.repetition_penalty = nb::cast<float>(t[4]);
            p.presence_penalty = nb::cast<float>(t[5]);
            p.frequency_penalty = nb::cast<float>(t[6]);
            p.penalty_last_n = nb::cast<int>(t[7]);
            ps.push_back(p);
        }
        return ps;
    };
    auto histories_of = [](HistArrays& histories) {
        std::vector<std::vector<int32_t>> hs;
        for (auto& h : histories) hs.emplace_back(h.data(), h.data() + h.shape(0));
        return hs;
    };
    m.def(
        "test_sample_rows",
        [sample_params, histories_of](nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> logits,
                                      std::vector<nb::tuple> params,
                                      nb::ndarray<const uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> states,
                                      HistArrays histories, bool split, bool split_full) {
            const int n = int(logits.shape(0)), V = int(logits.shape(1));
            std::vector<orcd::SamplerParams> ps = sample_params(params, "test_sample_rows");
            std::vector<uint64_t> st(states.data(), states.data() + states.shape(0));
            std::vector<std::vector<int32_t>> hs = histories_of(histories);
            std::pair<std::vector<int32_t>, std::vector<uint64_t>> r;
            {
                nb::gil_scoped_release nogil;
                r = orcd::cuda_test::sample_rows(logits.data(), n, V, ps, st, hs, split, split_full);
            }
            return nb::make_tuple(nb::cast(r.first), nb::cast(r.second));
        },
        "logits"_a, "params"_a, "states"_a, "histories"_a, "split"_a = true, "split_full"_a = false,
        "(tokens, states after the draw) of sample_rows on host logits [n, n_vocab]: row r with params[r] "
        "(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, "
        "penalty_last_n), generator state states[r] and history histories[r]; split=False: the one-block "
        "kernel for every row; split_full=True: rows with top_k off take the split path too.");
    m.def(
        "test_apply_token_masks",
        [](nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> logits,
           nb::ndarray<const uint32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> masks) {
            const int n = int(logits.shape(0)), V = int(logits.shape(1));
            if (int(masks.shape(0)) != n || int(masks.shape(1)) != orcd::token_mask_words(V))
                throw orcd::Error("test_apply_token_masks: masks must be uint32[" + std::to_string(n) + ", " +
                                  std::to_string(orcd::token_mask_words(V)) + "]");
            std::vector<float> r;
            {
                nb::gil_scoped_release nogil;
                r = orcd::cuda_test::apply_token_masks(logits.data(), n, V, masks.data());
            }
            return orcd::to_numpy(std::move(r), {size_t(n), size_t(V)});
        },
        "logits"_a, "masks"_a,
        "The structured-output mask kernel on host logits [n, n_vocab] with masks uint32[n, words]: the masked\n"
        "logits (a clear bit: -inf), as orcd._orcd.apply_token_mask does on the CPU.");
    m.def(
        "sample_rows_time",
        [sample_params, histories_of](nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> logits,
                                      std::vector<nb::tuple> params, HistArrays histories, bool split, int iters,
                                      bool split_full) {
            const int n = int(logits.shape(0)), V = int(logits.shape(1));
            std::vector<orcd::SamplerParams> ps = sample_params(params, "sample_rows_time");
            std::vector<std::vector<int32_t>> hs = histories_of(histories);
            nb::gil_scoped_release nogil;
            return orcd::cuda_test::sample_rows_time(logits.data(), n, V, ps, hs, split, iters, split_full);
        },
        "logits"_a, "params"_a, "histories"_a, "split"_a = true, "iters"_a = 50, "split_full"_a = false,
        "Microseconds per sample_rows launch (test_sample_rows' arguments, the engine's launch choice).");

    // ---- logprobs next to the logits against the CPU reference (orcd._orcd.logprobs)
    m.def(
        "test_logprob_rows",
        [](nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> logits,
           nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> chosen, int n_top) {
            const int n = int(logits.shape(0)), V = int(logits.shape(1));
            if (int(chosen.shape(0)) != n) throw orcd::Error("test_logprob_rows: chosen needs one id per row");
            std::vector<orcd::Logprobs> r;
            {
                nb::gil_scoped_release nogil;
                r = orcd::cuda_test::logprob_rows(logits.data(), n, V, chosen.data(), n_top);
            }
            nb::list out;
            for (const orcd::Logprobs& lp : r) out.append(orcd::logprobs_to_py(lp));
            return out;
        },
        "logits"_a, "chosen"_a, "n_top"_a,
        "The CUDA logprob kernel on host logits [n, n_vocab]: per row (logprob of chosen[r], [(id, logprob), ...]),\n"
        "as orcd._orcd.logprobs computes it on the CPU.");

    // ---- many sequences on a C++ thread (cpp/step_loop.h) over the CUDA engine
    orcd::bind_step_loop<1>(m, "CudaStepLoop", [](const std::string& path, int n_ctx, int n_slots, int,
                                                  size_t kv_memory) {
        return std::unique_ptr<orcd::Engine>(
            orcd::make_cuda_engine(std::make_shared<orcd::GGUFFile>(path), n_ctx, n_slots, nullptr, 0, kv_memory));
    });
}
