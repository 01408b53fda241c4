// bindings.cpp - the orcd._orcd extension module (nanobind).
//
// A thin layer: argument checking and NumPy conversion only. orcd::Error
// becomes ValueError (bad input: file, parameter), other C++ exceptions
// RuntimeError, messages unchanged. Long computations release the GIL.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <mutex>

#include "bind_engine.h"
#include "bind_info.h"
#include "bind_numpy.h"
#include "bind_step_loop.h"
#include "cpu_ops.h"
#include "engine.h"
#include "error.h"
#include "ggml_types.h"
#include "gguf.h"
#include "cpu_features.h"
#include "logprobs.h"
#include "matmul.h"
#include "quants.h"
#include "sampler.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace orcd;

namespace {

// NumPy helpers (to_numpy, float_out, In1D, In2D): bind_numpy.h.

// ============================================================ GGUF metadata -> Python

nb::object str_to_py(std::string_view s) {
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), (Py_ssize_t)s.size(), "replace");
    if (!o) throw nb::python_error();
    return nb::steal(o);
}

template <typename T>
nb::object numeric_array(const Value& v) {
    std::vector<T> out(v.count);
    if (v.count) std::memcpy(out.data(), v.raw, v.count * sizeof(T));
    return nb::cast(to_numpy(std::move(out), {(size_t)v.count}));
}

nb::object value_to_py(const Value& v) {
    switch (v.type) {
        case VT::U8: case VT::U16: case VT::U32: case VT::U64: return nb::int_(v.num.u);
        case VT::I8: case VT::I16: case VT::I32: case VT::I64: return nb::int_(v.num.i);
        case VT::F32: case VT::F64: return nb::float_(v.num.f);
        case VT::BOOL: return nb::bool_(v.num.u != 0);
        case VT::STRING: return str_to_py(v.str);
        case VT::ARRAY: {
            switch (v.elem) {
                case VT::U8: return numeric_array<uint8_t>(v);
                case VT::I8: return numeric_array<int8_t>(v);
                case VT::U16: return numeric_array<uint16_t>(v);
                case VT::I16: return numeric_array<int16_t>(v);
                case VT::U32: return numeric_array<uint32_t>(v);
                case VT::I32: return numeric_array<int32_t>(v);
                case VT::U64: return numeric_array<uint64_t>(v);
                case VT::I64: return numeric_array<int64_t>(v);
                case VT::F32: return numeric_array<float>(v);
                case VT::F64: return numeric_array<double>(v);
                case VT::BOOL: {  // one byte each, 0 or 1 (checked by the reader? no: normalise here)
                    std::vector<uint8_t> b(v.count);
                    for (uint64_t k = 0; k < v.count; ++k) b[k] = v.raw[k] != 0;
                    nb::object a = nb::cast(to_numpy(std::move(b), {(size_t)v.count}));
                    return a.attr("astype")("bool");
                }
                case VT::STRING: {
                    nb::list l;
                    for (std::string_view s : v.strs) l.append(str_to_py(s));
                    return l;
                }
                case VT::ARRAY: {
                    nb::list l;
                    for (const Value& item : v.items) l.append(value_to_py(item));
                    return l;
                }
            }
        }
    }
    return nb::none();
}

// ============================================================ GGUFFile wrapper

// The Python object holds a shared_ptr: zero-copy views of tensor bytes hold
// another, so close() never invalidates memory NumPy still points at. Calls
// that release the GIL (dequantize) take their own reference first, so a
// close() from another thread only drops the object's reference and the
// mapping goes away when the last running call returns.
struct PyGGUF {
    std::shared_ptr<GGUFFile> f;
    std::string path;

    const GGUFFile& file() const {
        if (!f) throw Error("GGUF file '" + path + "' is closed");
        return *f;
    }
    // A reference for a call that reads tensor data: checks first that the
    // file is open and was not truncated or rewritten since it was mapped.
    std::shared_ptr<GGUFFile> for_reading() const {
        file().check_unchanged();
        return f;
    }
};

std::vector<size_t> reversed_shape(const TensorInfo& t) {
    std::vector<size_t> s;
    for (int d = (int)t.n_dims - 1; d >= 0; --d) s.push_back((size_t)t.ne[d]);
    return s;
}

}  // namespace

NB_MODULE(_orcd, m) {
    m.doc() = "orcd native core: GGUF reader, dequantization, CPU engine, sampler";

    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const orcd::Error& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });

    // ---- types and dequantization
    m.def("type_traits", [](uint32_t id) -> nb::object {
        const TypeInfo* t = type_info(id);
        if (!t) return nb::none();
        return nb::make_tuple(t->name, t->block_size, t->block_bytes, t->dequantizable);
    }, nb::arg("type_id"), "(name, block_size, block_bytes, dequantizable) of a ggml type id, or None");

    m.def("dequantize_raw", [](uint32_t type, In1D<uint8_t> data, int64_t n, nb::object out_obj) -> nb::object {
        const TypeInfo* t = type_info(type);
        if (!t) throw Error("unknown ggml type id " + std::to_string(type));
        if (n < 0 || n % t->block_size != 0)
            throw Error("n = " + std::to_string(n) + " is not a multiple of the " + t->name + " block size " +
                        std::to_string(t->block_size));
        const uint64_t need = (uint64_t)(n / t->block_size) * t->block_bytes;
        if (data.shape(0) < need)
            throw Error(std::string(t->name) + ": " + std::to_string(n) + " elements need " + std::to_string(need) +
                        " bytes, got " + std::to_string(data.shape(0)));
        if (!out_obj.is_none()) {  // caller's buffer: measures the kernel without allocation and page faults
            auto out = nb::cast<nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu>>(out_obj);
            if ((int64_t)out.shape(0) < n)
                throw Error("out holds " + std::to_string(out.shape(0)) + " floats, need " + std::to_string(n));
            {
                nb::gil_scoped_release nogil;
                dequantize_row(type, data.data(), out.data(), n);
            }
            return out_obj;
        }
        FloatOut out = float_out({(size_t)n});
        {
            nb::gil_scoped_release nogil;
            dequantize_row(type, data.data(), out.data, n);
        }
        return nb::cast(out.array);
    }, nb::arg("type_id"), nb::arg("data"), nb::arg("n"), nb::arg("out") = nb::none(),
       "float32[n] of n elements of a ggml type; into `out` (float32, contiguous) when given");

    m.def("matmul", [](uint32_t type, In1D<uint8_t> w, int64_t n_in, int64_t n_out, In2D<float> x, int n_threads) {
        const TypeInfo* t = type_info(type);
        if (!t) throw Error("unknown ggml type id " + std::to_string(type));
        if (n_in <= 0 || n_out <= 0 || n_in % t->block_size != 0)
            throw Error("matmul: bad shape n_in=" + std::to_string(n_in) + " n_out=" + std::to_string(n_out));
        WeightView v;
        v.type = type;
        v.data = w.data();
        v.n_in = n_in;
        v.n_out = n_out;
        v.row_bytes = (size_t)(n_in / t->block_size) * t->block_bytes;
        if (w.shape(0) < v.row_bytes * (size_t)n_out)
            throw Error("matmul: weight buffer holds " + std::to_string(w.shape(0)) + " bytes, need " +
                        std::to_string(v.row_bytes * n_out));
        if ((int64_t)x.shape(1) != n_in)
            throw Error("matmul: x has " + std::to_string(x.shape(1)) + " columns, expected n_in = " + std::to_string(n_in));
        const int64_t m_rows = (int64_t)x.shape(0);
        std::vector<float> y((size_t)(m_rows * n_out));
        {
            nb::gil_scoped_release nogil;
            ThreadPool pool(n_threads);
            matmul(v, x.data(), m_rows, y.data(), pool);
        }
        return to_numpy(std::move(y), {(size_t)m_rows, (size_t)n_out});
    }, nb::arg("type_id"), nb::arg("w"), nb::arg("n_in"), nb::arg("n_out"), nb::arg("x"), nb::arg("n_threads") = 0);

    m.def("available_cores", &available_cores);
    m.def("cpu_kernel", [] { return std::string(matmul_kernel_name()); },
          "the CPU matmul variant in use: 'scalar', 'avx2' or 'avx512' (ORCD_CPU_KERNEL, else the best this CPU runs)");
    m.def("cpu_kernels", &matmul_kernels, "the CPU matmul variants this CPU runs, lowest first");
    m.def("set_cpu_kernel", [](const std::string& name) { return std::string(matmul_set_kernel(name)); },
          nb::arg("name"), "test hook: use this CPU matmul variant process-wide ('' = the default); returns the one in use");
    m.attr("native_build") = cpu_build_native();  // ORCD_NATIVE=ON: built for this machine's CPU only

    // ---- GGUF files
    nb::class_<PyGGUF>(m, "GGUFFile")
        .def("__init__", [](PyGGUF* self, const std::string& path) {
            std::shared_ptr<GGUFFile> f;
            {
                nb::gil_scoped_release nogil;
                f = std::make_shared<GGUFFile>(path);
            }
            new (self) PyGGUF{std::move(f), path};
        }, nb::arg("path"))
        .def_prop_ro("path", [](const PyGGUF& s) { return s.path; })
        .def_prop_ro("version", [](const PyGGUF& s) { return s.file().version(); })
        .def_prop_ro("alignment", [](const PyGGUF& s) { return s.file().alignment(); })
        .def_prop_ro("data_offset", [](const PyGGUF& s) { return s.file().data_offset(); })
        .def_prop_ro("file_size", [](const PyGGUF& s) { return s.file().file_size(); })
        .def_prop_ro("closed", [](const PyGGUF& s) { return !s.f; })
        .def("metadata_items", [](const PyGGUF& s) {
            nb::list l;
            for (const auto& [k, v] : s.file().metadata()) l.append(nb::make_tuple(str_to_py(k), value_to_py(v)));
            return l;
        })
        .def("metadata_value", [](const PyGGUF& s, const std::string& key) -> nb::object {
            const Value* v = s.file().find(key);
            return v ? value_to_py(*v) : nb::none();
        }, nb::arg("key"), "One metadata value (None if absent), without converting the rest")
        .def("metadata_summary", [](const PyGGUF& s) {
            // key -> (type name, array element type or "", array length): cheap, no big conversions
            nb::list l;
            for (const auto& [k, v] : s.file().metadata())
                l.append(nb::make_tuple(k, vt_name(v.type), v.type == VT::ARRAY ? vt_name(v.elem) : "", v.count));
            return l;
        })
        .def("tensor_infos", [](const PyGGUF& s) {
            nb::list l;
            for (const TensorInfo& t : s.file().tensors()) {
                nb::list ne;
                for (uint32_t d = 0; d < t.n_dims; ++d) ne.append(t.ne[d]);
                l.append(nb::make_tuple(t.name, nb::tuple(ne), type_name(t.type), t.type, t.offset, t.nbytes));
            }
            return l;
        })
        .def("tensor_bytes", [](const PyGGUF& s, const std::string& name) {
            std::shared_ptr<GGUFFile> f = s.for_reading();
            const TensorInfo& t = f->tensor(name);
            auto* keep = new std::shared_ptr<GGUFFile>(std::move(f));
            nb::capsule owner(keep, [](void* p) noexcept { delete (std::shared_ptr<GGUFFile>*)p; });
            size_t shape[1] = {(size_t)t.nbytes};
            return nb::ndarray<nb::numpy, const uint8_t>(t.data, 1, shape, owner);
        }, nb::arg("name"), "Zero-copy read-only uint8 view of a tensor's bytes")
        .def("dequantize", [](const PyGGUF& s, const std::string& name) {
            std::shared_ptr<GGUFFile> f = s.for_reading();
            const TensorInfo& t = f->tensor(name);
            FloatOut out = float_out(reversed_shape(t));
            {
                nb::gil_scoped_release nogil;
                dequantize_rows(t, 0, t.n_rows(), out.data);
            }
            return out.array;
        }, nb::arg("name"))
        .def("dequantize_rows", [](const PyGGUF& s, const std::string& name, int64_t r0, int64_t r1) {
            std::shared_ptr<GGUFFile> f = s.for_reading();
            const TensorInfo& t = f->tensor(name);
            if (r0 < 0 || r1 < r0 || r1 > t.n_rows())
                throw Error("tensor '" + name + "': rows [" + std::to_string(r0) + ", " + std::to_string(r1) +
                            ") out of range [0, " + std::to_string(t.n_rows()) + ")");
            FloatOut out = float_out({(size_t)(r1 - r0), (size_t)t.ne[0]});
            {
                nb::gil_scoped_release nogil;
                dequantize_rows(t, r0, r1, out.data);
            }
            return out.array;
        }, nb::arg("name"), nb::arg("r0"), nb::arg("r1"))
        .def("close", [](PyGGUF& s) { s.f.reset(); });

    // ---- sampler
    nb::class_<Sampler>(m, "Sampler")
        .def("__init__", [](Sampler* self, float temperature, int top_k, float top_p, float min_p,
                            float repetition_penalty, float presence_penalty, float frequency_penalty,
                            int penalty_last_n, uint64_t seed) {
            SamplerParams p;
            p.temperature = temperature;
            p.top_k = top_k;
            p.top_p = top_p;
            p.min_p = min_p;
            p.repetition_penalty = repetition_penalty;
            p.presence_penalty = presence_penalty;
            p.frequency_penalty = frequency_penalty;
            p.penalty_last_n = penalty_last_n;
            p.seed = seed;
            new (self) Sampler(p);
        },  // every argument required: the defaults live in orcd.SamplingParams (python/orcd/types.py)
           nb::arg("temperature"), nb::arg("top_k"), nb::arg("top_p"), nb::arg("min_p"),
           nb::arg("repetition_penalty"), nb::arg("presence_penalty"), nb::arg("frequency_penalty"),
           nb::arg("penalty_last_n"), nb::arg("seed"))
        .def("sample", [](Sampler& s, In1D<float> logits, In1D<int32_t> history) {
            return s.sample(logits.data(), (int)logits.shape(0), history.data(), (int)history.shape(0));
        }, nb::arg("logits"), nb::arg("history"))
        .def_prop_rw("rng_state", &Sampler::rng_state, &Sampler::set_rng_state,
                     "the generator's state (the GPU sampler continues the same stream)");

    // ---- structured output's mask (cpp/sampler.h): the CPU twin of the GPU's apply_token_masks
    m.def("apply_token_mask", [](In1D<float> logits, In1D<uint32_t> mask) {
        const int V = int(logits.shape(0));
        if (int(mask.shape(0)) != token_mask_words(V))
            throw Error("apply_token_mask: the mask must be uint32[" + std::to_string(token_mask_words(V)) + "] for " +
                        std::to_string(V) + " logits (got " + std::to_string(mask.shape(0)) + ")");
        std::vector<float> out(logits.data(), logits.data() + V);
        apply_token_mask(out.data(), V, mask.data());
        return to_numpy(std::move(out), {size_t(V)});
    }, nb::arg("logits"), nb::arg("mask"),
       "A copy of logits float32 [n_vocab] with every token whose bit (t % 32 of mask[t / 32]) is clear at -inf.");

    // ---- logprobs (cpp/logprobs.h): the CPU reference, also used by Model for its host logits
    m.def("logprobs", [](In2D<float> logits, In1D<int32_t> chosen, int n_top) {
        const int n = int(logits.shape(0)), V = int(logits.shape(1));
        if (int(chosen.shape(0)) != n)
            throw Error("logprobs: chosen has " + std::to_string(chosen.shape(0)) + " ids for " + std::to_string(n) +
                        " rows of logits");
        std::vector<Logprobs> out(static_cast<size_t>(n));
        {
            nb::gil_scoped_release nogil;
            for (int i = 0; i < n; ++i) compute_logprobs(logits.data() + size_t(i) * V, V, chosen.data()[i], n_top,
                                                         out[size_t(i)]);
        }
        nb::list res;
        for (const Logprobs& lp : out) res.append(logprobs_to_py(lp));
        return res;
    }, nb::arg("logits"), nb::arg("chosen"), nb::arg("n_top"),
       "Per row of logits float32 [n, n_vocab]: (logprob of chosen[i], [(id, logprob), ...] the n_top best,\n"
       "best first) under log_softmax of the raw logits (NaN as -inf). n_top in [0, 20].");

    // ---- CPU engine (methods: bind_engine.h)
    using PyEngine = EngineHolder<Engine>;
    nb::class_<PyEngine> cpu_engine(m, "CpuEngine");
    cpu_engine.def("__init__", [](PyEngine* self, const std::string& path, int n_ctx, int n_slots, int n_threads,
                                  size_t kv_memory) {
        std::unique_ptr<Engine> e;
        {
            nb::gil_scoped_release nogil;
            e = make_cpu_engine(std::make_shared<GGUFFile>(path), n_ctx, n_slots, n_threads, kv_memory);
        }
        new (self) PyEngine{std::move(e)};
    }, nb::arg("path"), nb::arg("n_ctx") = 4096, nb::arg("n_slots") = 1, nb::arg("n_threads") = 0,
       nb::arg("kv_memory") = 0);
    bind_engine_methods<Engine>(cpu_engine, [](const Engine& e) {
        nb::dict d = engine_info_dict(e, "cpu");
        d["cpu_kernel"] = matmul_kernel_name();
        return d;
    });

    // ---- many sequences on a C++ thread (cpp/step_loop.h)
    bind_step_loop<0>(m, "StepLoop", [](const std::string& path, int n_ctx, int n_slots, int n_threads,
                                        size_t kv_memory) {
        return make_cpu_engine(std::make_shared<GGUFFile>(path), n_ctx, n_slots, n_threads, kv_memory);
    });
    // ---- ops: the CPU engine's operations one at a time (cpp/cpu_ops.h), for kernel-level
    // tests against the NumPy reference and the CUDA twins (orcd._orcd_cuda.<name>).
    // The KV caches are float32 arrays in the engine's layout, written in place:
    // kt [n_slots, n_head_kv, head_dim, n_ctx] (K transposed), v [n_slots, n_ctx, n_head_kv*head_dim].
    {
        using In3F = nb::ndarray<const float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
        using KtF = nb::ndarray<float, nb::ndim<4>, nb::c_contig, nb::device::cpu>;
        using VcF = nb::ndarray<float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
        auto copy_of = [](const float* p, std::vector<size_t> shape) {
            size_t n = 1;
            for (size_t d : shape) n *= d;
            FloatOut o = float_out(std::move(shape));
            if (n) std::memcpy(o.data, p, n * sizeof(float));
            return o;
        };
        // The cache of a (kt, v) pair; checks that the shapes agree with each other and
        // with head_dim, and that every (slot, pos) lies inside it.
        auto cache_of = [](float* kt, const std::vector<size_t>& ks, float* v, const std::vector<size_t>& vs,
                           int head_dim, In1D<int32_t> slots, In1D<int32_t> pos, size_t n, const char* who) {
            const std::string w(who);
            if (ks[2] != (size_t)head_dim || vs[0] != ks[0] || vs[1] != ks[3] || vs[2] != ks[1] * ks[2])
                throw Error(w + ": kt must be [n_slots, n_head_kv, head_dim, n_ctx] and v [n_slots, n_ctx, "
                                "n_head_kv*head_dim] with the head_dim of the rows");
            if (slots.shape(0) != n || pos.shape(0) != n)
                throw Error(w + ": slots and pos need one entry per token (" + std::to_string(n) + ")");
            for (size_t i = 0; i < n; ++i) {
                if (slots.data()[i] < 0 || (size_t)slots.data()[i] >= ks[0])
                    throw Error(w + ": slot " + std::to_string(slots.data()[i]) + " out of range [0, " +
                                std::to_string(ks[0]) + ")");
                if (pos.data()[i] < 0 || (size_t)pos.data()[i] >= ks[3])
                    throw Error(w + ": pos " + std::to_string(pos.data()[i]) + " out of range [0, " +
                                std::to_string(ks[3]) + ")");
            }
            return cpu_ops::KvCache{kt, v, vs[1] * vs[2], (int)ks[3], (int)ks[1], head_dim};
        };

        m.def("cpu_ops_rmsnorm", [](In2D<float> x, In1D<float> w, float eps) {
            if (w.shape(0) != x.shape(1)) throw Error("cpu_ops_rmsnorm: w must have x's row length");
            FloatOut o = float_out({x.shape(0), x.shape(1)});
            cpu_ops::rmsnorm(x.data(), w.data(), o.data, (int)x.shape(0), (int)x.shape(1), eps);
            return o.array;
        }, nb::arg("x"), nb::arg("w"), nb::arg("eps"), "x[n, d] / sqrt(mean(x²) + eps) * w[d], per row");

        m.def("cpu_ops_add_bias", [copy_of](In2D<float> x, In1D<float> b) {
            if (b.shape(0) != x.shape(1)) throw Error("cpu_ops_add_bias: b must have x's row length");
            FloatOut o = copy_of(x.data(), {x.shape(0), x.shape(1)});
            cpu_ops::add_bias(o.data, b.data(), (int)x.shape(0), (int)x.shape(1));
            return o.array;
        }, nb::arg("x"), nb::arg("b"), "x[n, d] + b[d]");

        m.def("cpu_ops_rope_neox", [copy_of](In3F x, In1D<int32_t> pos, double base) {
            const int n = (int)x.shape(0), heads = (int)x.shape(1), hd = (int)x.shape(2);
            if ((size_t)n != pos.shape(0)) throw Error("cpu_ops_rope_neox: pos needs one entry per token");
            if (hd % 2) throw Error("cpu_ops_rope_neox: head_dim " + std::to_string(hd) + " is odd");
            FloatOut o = copy_of(x.data(), {x.shape(0), x.shape(1), x.shape(2)});
            std::vector<double> inv_freq(hd / 2);
            cpu_ops::rope_inv_freq(hd, base, inv_freq.data());
            std::vector<float> cs((size_t)n * hd / 2), sn((size_t)n * hd / 2);
            cpu_ops::rope_tables(pos.data(), n, inv_freq.data(), hd / 2, cs.data(), sn.data());
            for (int i = 0; i < n; ++i)
                cpu_ops::rope_neox(o.data + (size_t)i * heads * hd, heads, hd, &cs[(size_t)i * hd / 2],
                                   &sn[(size_t)i * hd / 2]);
            return o.array;
        }, nb::arg("x"), nb::arg("pos"), nb::arg("base"),
           "NEOX RoPE of x[n, n_heads, head_dim], token t at position pos[t]");

        m.def("cpu_ops_kv_append", [cache_of](KtF kt, VcF vc, In3F k, In3F v, In1D<int32_t> slots,
                                              In1D<int32_t> pos) {
            if (k.shape(0) != v.shape(0) || k.shape(1) != v.shape(1) || k.shape(2) != v.shape(2) ||
                k.shape(1) != kt.shape(1))
                throw Error("cpu_ops_kv_append: k and v must be [n, n_head_kv, head_dim] with the cache's n_head_kv");
            const cpu_ops::KvCache kv = cache_of(kt.data(), {kt.shape(0), kt.shape(1), kt.shape(2), kt.shape(3)},
                                                 vc.data(), {vc.shape(0), vc.shape(1), vc.shape(2)},
                                                 (int)k.shape(2), slots, pos, k.shape(0), "cpu_ops_kv_append");
            cpu_ops::kv_append(kv, k.data(), v.data(), (int)k.shape(0), slots.data(), pos.data());
        }, nb::arg("kt"), nb::arg("v_cache"), nb::arg("k"), nb::arg("v"), nb::arg("slots"), nb::arg("pos"),
           "Writes k, v [n, n_head_kv, head_dim] of token i at (slots[i], pos[i]) into the caches (in place)");

        m.def("cpu_ops_attention", [cache_of](In3F q, KtF kt, VcF vc, In1D<int32_t> slots, In1D<int32_t> pos,
                                              int n_threads) {
            const int n = (int)q.shape(0), n_head = (int)q.shape(1), hd = (int)q.shape(2);
            const int n_head_kv = (int)kt.shape(1);
            if (n_head_kv < 1 || n_head % n_head_kv)
                throw Error("cpu_ops_attention: n_head " + std::to_string(n_head) + " is not a multiple of n_head_kv " +
                            std::to_string(n_head_kv));
            const cpu_ops::KvCache kv = cache_of(kt.data(), {kt.shape(0), kt.shape(1), kt.shape(2), kt.shape(3)},
                                                 vc.data(), {vc.shape(0), vc.shape(1), vc.shape(2)}, hd, slots,
                                                 pos, (size_t)n, "cpu_ops_attention");
            FloatOut o = float_out({q.shape(0), q.shape(1), q.shape(2)});
            {
                nb::gil_scoped_release nogil;
                ThreadPool pool(n_threads);
                cpu_ops::attention(q.data(), n, n_head, kv, slots.data(), pos.data(), o.data, pool);
            }
            return o.array;
        }, nb::arg("q"), nb::arg("kt"), nb::arg("v_cache"), nb::arg("slots"), nb::arg("pos"),
           nb::arg("n_threads") = 0,
           "Causal GQA attention: query i [n, n_head, head_dim] over positions [0, pos[i]] of slot slots[i]");

        m.def("cpu_ops_geglu_tanh", [copy_of](nb::ndarray<const float, nb::c_contig, nb::device::cpu> g,
                                              nb::ndarray<const float, nb::c_contig, nb::device::cpu> u) {
            if (g.size() != u.size()) throw Error("cpu_ops_geglu_tanh: g and u differ in size");
            std::vector<size_t> shape(g.ndim());
            for (size_t i = 0; i < g.ndim(); ++i) shape[i] = g.shape(i);
            FloatOut o = copy_of(g.data(), shape);
            {
                nb::gil_scoped_release nogil;
                ThreadPool pool(1);
                cpu_ops::geglu_tanh(o.data, u.data(), (int64_t)g.size(), pool);
            }
            return o.array;
        }, nb::arg("g"), nb::arg("u"), "gemma3's FFN gate: g = gelu_tanh(g) * u (a copy)");

        m.def("cpu_ops_swiglu", [copy_of](nb::ndarray<const float, nb::c_contig, nb::device::cpu> g,
                                          nb::ndarray<const float, nb::c_contig, nb::device::cpu> u, int n_threads) {
            if (g.size() != u.size()) throw Error("cpu_ops_swiglu: g and u differ in size");
            std::vector<size_t> shape(g.ndim());
            for (size_t i = 0; i < g.ndim(); ++i) shape[i] = g.shape(i);
            FloatOut o = copy_of(g.data(), shape);
            {
                nb::gil_scoped_release nogil;
                ThreadPool pool(n_threads);
                cpu_ops::swiglu(o.data, u.data(), (int64_t)g.size(), pool);
            }
            return o.array;
        }, nb::arg("g"), nb::arg("u"), nb::arg("n_threads") = 0, "silu(g) * u, elementwise");
    }
}
