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

#include "bind_info.h"
#include "engine.h"
#include "error.h"
#include "ggml_types.h"
#include "gguf.h"
#include "matmul.h"
#include "quants.h"
#include "sampler.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace orcd;

namespace {

// ============================================================ NumPy helpers

template <typename T>
using NpArray = nb::ndarray<nb::numpy, T>;

// Hands a heap vector to NumPy without copying; the capsule frees it.
template <typename T>
NpArray<T> to_numpy(std::vector<T>&& v, std::vector<size_t> shape) {
    auto* heap = new std::vector<T>(std::move(v));
    nb::capsule owner(heap, [](void* p) noexcept { delete (std::vector<T>*)p; });
    return NpArray<T>(heap->data(), shape.size(), shape.data(), owner);
}

// A fresh float32 NumPy array of `shape` whose memory is not zero-filled:
// for outputs a kernel overwrites completely (dequantization of big tensors).
struct FloatOut {
    float* data;
    NpArray<float> array;
};
FloatOut float_out(std::vector<size_t> shape) {
    size_t n = 1;
    for (size_t d : shape) n *= d;
    float* p = new float[n ? n : 1];  // default-initialised: no page-touching zero fill
    nb::capsule owner(p, [](void* q) noexcept { delete[] (float*)q; });
    return {p, NpArray<float>(p, shape.size(), shape.data(), owner)};
}

template <typename T>
using In1D = nb::ndarray<const T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
template <typename T>
using In2D = nb::ndarray<const T, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

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

// ============================================================ engine wrapper

// Calls into one engine are serialised: its KV cache and thread pool serve
// one caller at a time, and Python threads may share a Model.
struct PyEngine {
    std::unique_ptr<Engine> e;
    std::unique_ptr<std::mutex> mu = std::make_unique<std::mutex>();

    Engine& eng() {
        if (!e) throw Error("engine is closed");
        return *e;
    }

    NpArray<float> forward(int slot, In1D<int32_t> tokens, int pos0, bool all_logits) {
        Engine& en = eng();
        const int n = (int)tokens.shape(0);
        const size_t V = (size_t)en.desc().n_vocab;
        FloatOut out = all_logits ? float_out({(size_t)n, V}) : float_out({V});
        {
            nb::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lock(*mu);
            eng().forward(slot, tokens.data(), n, pos0, out.data, all_logits, nullptr);
        }
        return out.array;
    }

    nb::tuple trace(In1D<int32_t> tokens) {
        Engine& en = eng();
        const int n = (int)tokens.shape(0);
        const size_t V = (size_t)en.desc().n_vocab;
        std::vector<float> logits((size_t)n * V);
        Trace tr;
        {
            nb::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lock(*mu);
            eng().forward(0, tokens.data(), n, 0, logits.data(), true, &tr);
        }
        nb::list hidden;
        for (auto& h : tr.hidden) hidden.append(to_numpy(std::move(h), {(size_t)n, (size_t)tr.n_embd}));
        return nb::make_tuple(hidden, to_numpy(std::move(logits), {(size_t)n, V}));
    }

    NpArray<float> decode_batch(In1D<int32_t> slots, In1D<int32_t> tokens, In1D<int32_t> pos) {
        Engine& en = eng();
        const int n = (int)tokens.shape(0);
        if ((int)slots.shape(0) != n || (int)pos.shape(0) != n)
            throw Error("decode_batch: slots, tokens and pos must have the same length");
        const size_t V = (size_t)en.desc().n_vocab;
        FloatOut out = float_out({(size_t)n, V});
        {
            nb::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lock(*mu);
            eng().decode_batch(n, slots.data(), tokens.data(), pos.data(), out.data);
        }
        return out.array;
    }

    // n_steps greedy tokens after `first_token` at `pos` (llama-bench's tg: no sampling).
    NpArray<int32_t> decode_greedy(int slot, int32_t first_token, int pos, int n_steps) {
        if (n_steps < 0) throw Error("decode_greedy: n_steps must be >= 0 (got " + std::to_string(n_steps) + ")");
        std::vector<int32_t> out((size_t)n_steps);
        {
            nb::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lock(*mu);
            eng().decode_greedy(slot, first_token, pos, n_steps, out.data());
        }
        return to_numpy(std::move(out), {(size_t)n_steps});
    }

    nb::dict info() { return engine_info_dict(eng(), "cpu"); }
};

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
        }, nb::arg("temperature") = 0.8f, nb::arg("top_k") = 40, nb::arg("top_p") = 0.95f, nb::arg("min_p") = 0.05f,
           nb::arg("repetition_penalty") = 1.0f, nb::arg("presence_penalty") = 0.0f,
           nb::arg("frequency_penalty") = 0.0f, nb::arg("penalty_last_n") = 64, nb::arg("seed") = 0)
        .def("sample", [](Sampler& s, In1D<float> logits, In1D<int32_t> history) {
            return s.sample(logits.data(), (int)logits.shape(0), history.data(), (int)history.shape(0));
        }, nb::arg("logits"), nb::arg("history"));

    // ---- CPU engine
    nb::class_<PyEngine>(m, "CpuEngine")
        .def("__init__", [](PyEngine* self, const std::string& path, int n_ctx, int n_slots, int n_threads) {
            std::unique_ptr<Engine> e;
            {
                nb::gil_scoped_release nogil;
                e = make_cpu_engine(std::make_shared<GGUFFile>(path), n_ctx, n_slots, n_threads);
            }
            new (self) PyEngine{std::move(e)};
        }, nb::arg("path"), nb::arg("n_ctx") = 4096, nb::arg("n_slots") = 1, nb::arg("n_threads") = 0)
        .def("forward", &PyEngine::forward, nb::arg("slot"), nb::arg("tokens"), nb::arg("pos0"),
             nb::arg("all_logits") = false)
        .def("trace", &PyEngine::trace, nb::arg("tokens"))
        .def("decode_batch", &PyEngine::decode_batch, nb::arg("slots"), nb::arg("tokens"), nb::arg("pos"))
        .def("decode_greedy", &PyEngine::decode_greedy, nb::arg("slot"), nb::arg("first_token"), nb::arg("pos"),
             nb::arg("n_steps"))
        .def("info", &PyEngine::info)
        .def("close", [](PyEngine& s) {
            nb::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lock(*s.mu);
            s.e.reset();
        });
}
