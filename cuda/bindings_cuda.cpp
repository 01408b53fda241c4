// bindings_cuda.cpp - the nanobind module orcd._orcd_cuda.
//
//   cuda_status() -> str             "" when a usable GPU is present, else why not
//   device_info(device=0) -> dict
//   CudaEngine(path, n_ctx, n_slots=1, progress=None, device=0)
//       .forward(slot, tokens int32[n], pos0, all_logits=False) -> float32 [n_vocab] | [n, n_vocab]
//       .trace(tokens) -> (list of float32 [n, n_embd] x (n_layer+1), float32 [n, n_vocab])
//       .decode_batch(slots, tokens, pos) -> float32 [n, n_vocab]
//       .decode_greedy(slot, first_token, pos, n_steps) -> int32 [n_steps]   greedy tokens, argmax on the GPU
//       .set_options(fast_decode=None, graphs=None, pdl=None, fused_prompt=None)   switches of the fast paths
//       .paths() -> dict   what is in use: fast_decode, graphs, pdl, fused_prompt, *_available, note
//       .profile_decode(slot, token, pos, n_steps=16) -> dict   us per step by kernel kind, and graph_step
//       .info() -> dict (hyperparameters, n_ctx, n_slots, vram_* bytes, device, paths)
//       .close()                          frees the GPU memory now
//   kernel entry points for the tests (NumPy in, NumPy out; see cuda_api.h):
//   dequantize_f16, matvec, gemm, dec_matvec, get_rows, rmsnorm, rope, attention, swiglu, add_bias
//
// orcd::CudaError (CUDA/cuBLAS failures, not enough GPU memory) becomes
// RuntimeError, other orcd::Error (bad input) ValueError, messages unchanged.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bind_engine.h"
#include "bind_info.h"
#include "cuda_api.h"
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
    r["pdl_trigger"] = e.options().pdl_trigger;
    r["fast_decode_available"] = p.fast_decode_available;
    r["pdl_available"] = p.pdl_available;
    r["note"] = p.note;
    return r;
}

nb::dict engine_info(const orcd::CudaEngine& e) {
    nb::dict r = orcd::engine_info_dict(e, "cuda");
    r["prompt_chunk"] = e.max_prompt_chunk();
    const orcd::CudaMemoryUse m = e.memory_use();
    r["vram_weights"] = m.weights;
    r["vram_kv"] = m.kv;
    r["vram_scratch"] = m.scratch;
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
               int device) {
                orcd::ProgressFn fn;
                if (!progress.is_none()) {
                    fn = [progress](uint64_t done, uint64_t total) { progress(done, total); };
                }
                auto file = std::make_shared<orcd::GGUFFile>(path);
                new (self) PyCudaEngine{orcd::make_cuda_engine(file, n_ctx, n_slots, fn, device)};
            },
            "path"_a, "n_ctx"_a, "n_slots"_a = 1, "progress"_a = nb::none(), "device"_a = 0)
        .def(
            "set_options",
            [](PyCudaEngine& self, nb::object fast_decode, nb::object graphs, nb::object pdl,
               nb::object fused_prompt, nb::object pdl_trigger) {
                orcd::CudaEngine& e = self.get();
                orcd::CudaOptions o = e.options();
                if (!fast_decode.is_none()) o.fast_decode = nb::cast<bool>(fast_decode);
                if (!graphs.is_none()) o.graphs = nb::cast<bool>(graphs);
                if (!pdl.is_none()) o.pdl = nb::cast<bool>(pdl);
                if (!fused_prompt.is_none()) o.fused_prompt = nb::cast<bool>(fused_prompt);
                if (!pdl_trigger.is_none()) o.pdl_trigger = nb::cast<int>(pdl_trigger);
                e.set_options(o);
                return paths_dict(e);
            },
            "fast_decode"_a = nb::none(), "graphs"_a = nb::none(), "pdl"_a = nb::none(),
            "fused_prompt"_a = nb::none(), "pdl_trigger"_a = nb::none(),
            "Turn fast paths on/off (None leaves one as is); returns paths().")
        .def(
            "profile_decode",
            [](PyCudaEngine& self, int slot, int32_t token, int pos, int n_steps) {
                orcd::CudaEngine& e = self.get();
                std::vector<std::pair<std::string, double>> r;
                {
                    nb::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(*self.mu);
                    r = self.get().profile_decode(slot, token, pos, n_steps);
                }
                nb::dict d;
                for (auto& kv : r) d[kv.first.c_str()] = kv.second;
                return d;
            },
            "slot"_a, "token"_a, "pos"_a, "n_steps"_a = 16,
            "Microseconds per decode step by kernel kind (events around each kernel, no PDL) and "
            "'graph_step' (the step as the engine runs it).")
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
           float eps) {
            if (x.ndim() != 1 || int64_t(x.shape(0)) != n_in) bad("dec_matvec: x must be [n_in]");
            std::vector<float> kn;
            const float* nw = opt_f32(norm_w, size_t(n_in), kn, "dec_matvec norm_w");
            int32_t arg = -1;
            auto r = orcd::cuda_test::dec_matvec(type, w.data(), w.size(), n_in, n_out, x.data(), nw, eps, &arg);
            return nb::make_tuple(to_numpy(std::move(r), {size_t(n_out)}), arg);
        },
        "type_id"_a, "w"_a, "n_in"_a, "n_out"_a, "x"_a, "norm_w"_a = nb::none(), "eps"_a = 1e-6f,
        "(y[n_out], argmax) = W · rmsnorm(x) through the fused decode mat-vec (int8 activations for "
        "Q4_0/Q5_0/Q8_0/Q4_K/Q6_K) and its device-side argmax.");

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
        "rope",
        [](CArr<float> x, CArr<int32_t> pos, float base) {
            if (x.ndim() != 3 || pos.ndim() != 1 || pos.shape(0) != x.shape(0))
                bad("rope: x must be [n_tok, n_heads, head_dim] and pos [n_tok]");
            auto r = orcd::cuda_test::rope(x.data(), int(x.shape(0)), int(x.shape(1)), int(x.shape(2)), pos.data(),
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
        "swiglu",
        [](CArr<float> g, CArr<float> u) {
            if (g.size() != u.size()) bad("swiglu: g and u differ in size");
            auto r = orcd::cuda_test::swiglu(g.data(), u.data(), int64_t(g.size()));
            return to_numpy(std::move(r), shape_of(g));
        },
        "g"_a, "u"_a);

    m.def(
        "add_bias",
        [](CArr<float> x, CArr<float> b) {
            if (x.ndim() != 2 || b.ndim() != 1 || b.shape(0) != x.shape(1)) bad("add_bias: x [rows, n], b [n]");
            auto r = orcd::cuda_test::add_bias(x.data(), int64_t(x.shape(0)), int64_t(x.shape(1)), b.data());
            return to_numpy(std::move(r), {x.shape(0), x.shape(1)});
        },
        "x"_a, "b"_a);
}
