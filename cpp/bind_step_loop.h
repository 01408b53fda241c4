// bind_step_loop.h - the Python face of StepLoop, one definition for every backend
// (orcd._orcd.StepLoop on the CPU engine, orcd._orcd_cuda.CudaStepLoop on the CUDA one).
// Included by exactly one translation unit per module.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <functional>
#include <memory>
#include <string>

#include "bind_logprobs.h"
#include "step_loop.h"

namespace orcd {

using MakeEngineFn = std::function<std::unique_ptr<Engine>(const std::string& path, int n_ctx, int n_slots,
                                                           int n_threads, size_t kv_memory)>;

// Each call holds its own reference while the GIL is released, so close() from one thread
// never frees the loop under another thread's take_events. Backend: a distinct C++ type per
// module (nanobind registers each C++ type once across modules).
template <int Backend>
struct PyStepLoop {
    std::shared_ptr<StepLoop> loop;
    // Structured output: id -> the Python mask function of each request submitted with one.
    // The loop thread calls it through a borrowed pointer; this dict keeps it alive until the
    // request's terminal event is taken (no call follows that event) or the loop is closed.
    nanobind::dict mask_fns;
    bool python_masks = false;  // a request had a mask function: the loop thread may wait for the GIL
    std::shared_ptr<StepLoop> get() const {
        std::shared_ptr<StepLoop> l = loop;
        if (!l) throw Error("the step loop is closed");
        return l;
    }
    ~PyStepLoop() {
        if (python_masks && loop) {  // never join a loop thread that waits for the GIL while holding it
            nanobind::gil_scoped_release nogil;
            loop.reset();
        }
    }
};

inline bool python_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing() != 0;
#else
    return _Py_IsFinalizing() != 0;
#endif
}

// The StepRequest mask function that calls fn(generated: int32[n] (read-only), mask: uint32[words])
// under the GIL; fn fills mask in place. fn is borrowed (PyStepLoop::mask_fns owns it). A Python
// exception ends the request with an error naming it.
inline TokenMaskFn python_mask_fn(nanobind::handle fn, int n_vocab) {
    namespace nb = nanobind;
    const size_t words = size_t(token_mask_words(n_vocab));
    return [fn, words](const int32_t* generated, int n, uint32_t* mask) {
        if (python_finalizing()) throw Error("structured output: the Python interpreter is shutting down");
        nb::gil_scoped_acquire gil;
        try {
            using In = nb::ndarray<nb::numpy, const int32_t, nb::ndim<1>>;
            using Out = nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>>;
            // views of the loop's memory (rv_policy::reference: no copy), valid during the call
            fn(nb::cast(In(generated, {size_t(n)}), nb::rv_policy::reference),
               nb::cast(Out(mask, {words}), nb::rv_policy::reference));
        } catch (nb::python_error& e) {
            std::string msg = nb::str(e.value()).c_str();
            throw Error("structured output: " + msg);
        }
    };
}

template <int Backend>
void bind_step_loop(nanobind::module_& m, const char* name, MakeEngineFn make) {
    namespace nb = nanobind;
    using PyStepLoop = orcd::PyStepLoop<Backend>;
    using Tokens = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
    nb::class_<PyStepLoop>(m, name,
        "Many sequences generated on a C++ thread: submit() requests, take_events() their tokens.\n"
        "Events are (id, token, finish, message): token >= 0 with finish '' or 'length' (the last one),\n"
        "or token -1 with finish 'stop', 'cancelled' or 'error' (message says why). Every request\n"
        "ends with exactly one event whose finish is not ''.\n"
        "An event of a request that asked for logprobs is a 5-tuple: the fifth item a dict with\n"
        "'logprobs': (logprob, [(id, logprob), ...]) of its token, and on the request's first event,\n"
        "when it asked for prompt logprobs, 'prompt_logprobs': one such pair per prompt token after\n"
        "the first (cpp/logprobs.h: the raw distribution, before penalties, temperature and top-k/p).")
        .def("__init__", [make](PyStepLoop* self, const std::string& path, int n_ctx, int n_slots, int n_threads,
                                int max_waiting, int prefill_chunk, size_t kv_memory) {
            std::shared_ptr<StepLoop> l;
            {
                nb::gil_scoped_release nogil;
                l = std::make_shared<StepLoop>(make(path, n_ctx, n_slots, n_threads, kv_memory), max_waiting,
                                               prefill_chunk);
            }
            new (self) PyStepLoop{std::move(l)};
        }, nb::arg("path"), nb::arg("n_ctx") = 4096, nb::arg("n_slots") = 8, nb::arg("n_threads") = 0,
           nb::arg("max_waiting") = 256, nb::arg("prefill_chunk") = 512, nb::arg("kv_memory") = 0,
           "n_slots sequences run at once (each up to n_ctx positions); up to max_waiting more wait;\n"
           "a step evaluates at most prefill_chunk prompt tokens. n_threads: CPU engine only.\n"
           "kv_memory: bytes of the KV pool the slots share (0: the engine's default; cpp/kv_pool.h).")
        .def("submit", [](PyStepLoop& s, int64_t id, Tokens prompt, int max_tokens, std::vector<int32_t> stop_ids,
                          float temperature, int top_k, float top_p, float min_p, float repetition_penalty,
                          float presence_penalty, float frequency_penalty, int penalty_last_n, uint64_t seed,
                          int n_logprobs, int n_prompt_logprobs, nb::object mask_fn, bool reuse_prefix) {
            StepRequest r;
            r.id = id;
            r.prompt.assign(prompt.data(), prompt.data() + prompt.shape(0));
            r.max_tokens = max_tokens;
            r.stop_ids = std::move(stop_ids);
            r.sampling = {temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                          frequency_penalty, penalty_last_n, seed};
            r.n_logprobs = n_logprobs;
            r.n_prompt_logprobs = n_prompt_logprobs;
            r.reuse_prefix = reuse_prefix;
            std::shared_ptr<StepLoop> l = s.get();
            if (mask_fn.is_none()) {
                nb::gil_scoped_release nogil;
                try {
                    l->submit(std::move(r));
                } catch (const QueueFull&) {
                    return false;
                }
                return true;
            }
            if (!PyCallable_Check(mask_fn.ptr())) throw Error("mask_fn must be callable or None");
            // registered first: the loop may call it before submit returns
            nb::object before = s.mask_fns.attr("get")(id);
            s.mask_fns[nb::int_(id)] = mask_fn;
            s.python_masks = true;
            r.mask_fn = python_mask_fn(mask_fn, l->desc().n_vocab);
            bool queued = false;
            try {
                nb::gil_scoped_release nogil;
                l->submit(std::move(r));
                queued = true;
            } catch (const QueueFull&) {
            } catch (...) {
                if (before.is_none()) s.mask_fns.attr("pop")(id); else s.mask_fns[nb::int_(id)] = before;
                throw;
            }
            if (!queued) {
                if (before.is_none()) s.mask_fns.attr("pop")(id); else s.mask_fns[nb::int_(id)] = before;
            }
            return queued;
        }, nb::arg("id"), nb::arg("prompt"), nb::arg("max_tokens"), nb::arg("stop_ids"), nb::arg("temperature"),
           nb::arg("top_k"), nb::arg("top_p"), nb::arg("min_p"), nb::arg("repetition_penalty"),
           nb::arg("presence_penalty"), nb::arg("frequency_penalty"), nb::arg("penalty_last_n"), nb::arg("seed"),
           nb::arg("n_logprobs") = -1, nb::arg("n_prompt_logprobs") = -1, nb::arg("mask_fn") = nb::none(),
           nb::arg("reuse_prefix") = true,
           "Queues a request; False when the queue is full (retry later). Bad input raises ValueError.\n"
           "n_logprobs / n_prompt_logprobs: -1 (none) or 0..20 top tokens, see the class docstring.\n"
           "mask_fn (structured output): mask_fn(generated int32[n], mask uint32[(n_vocab + 31) // 32]) fills\n"
           "mask in place before each token: bit t % 32 of mask[t // 32] set = token t may be sampled.\n"
           "It runs on the loop thread under the GIL; an exception ends the request with 'error'.\n"
           "Logprobs stay those of the unmasked distribution.")
        .def("cancel", [](PyStepLoop& s, int64_t id) {
            std::shared_ptr<StepLoop> l = s.get();
            nb::gil_scoped_release nogil;
            return l->cancel(id);
        }, nb::arg("id"), "Ends a live request at the next step ('cancelled'); False if no such request.")
        .def("take_events", [](PyStepLoop& s, int timeout_ms) {
            std::shared_ptr<StepLoop> l = s.get();
            std::vector<StepEvent> ev;
            {
                nb::gil_scoped_release nogil;
                ev = l->take_events(timeout_ms);
            }
            nb::list out;
            for (const StepEvent& e : ev) {
                if (!e.has_logprobs && !e.has_prompt_logprobs) {
                    out.append(nb::make_tuple(e.id, e.token, finish_name(e.finish), e.message));
                    continue;
                }
                nb::dict lp;
                if (e.has_logprobs) lp["logprobs"] = logprobs_to_py(e.logprobs);
                if (e.has_prompt_logprobs) {
                    nb::list pl;
                    for (const Logprobs& p : e.prompt_logprobs) pl.append(logprobs_to_py(p));
                    lp["prompt_logprobs"] = pl;
                }
                out.append(nb::make_tuple(e.id, e.token, finish_name(e.finish), e.message, lp));
            }
            if (s.mask_fns.size())  // no call follows a terminal event: let go of its mask function
                for (const StepEvent& e : ev)
                    if (e.finish != Finish::none) s.mask_fns.attr("pop")(e.id, nb::none());
            return out;
        }, nb::arg("timeout_ms") = 0, "Events so far, waiting up to timeout_ms for one when there are none.")
        .def("stats", [](PyStepLoop& s) {
            StepStats st = s.get()->stats();
            nb::dict d;
            d["running"] = st.running;
            d["waiting"] = st.waiting;
            d["steps"] = st.steps;
            d["prompt_tokens"] = st.prompt_tokens;
            d["generated"] = st.generated;
            d["finished"] = st.finished;
            d["kv_positions"] = st.kv_positions;
            d["kv_reserved"] = st.kv_reserved;
            d["kv_waits"] = st.kv_waits;
            d["host_sampled"] = st.host_sampled;
            return d;
        })
        .def_prop_ro("n_ctx", [](PyStepLoop& s) { return s.get()->n_ctx(); })
        .def_prop_ro("n_slots", [](PyStepLoop& s) { return s.get()->n_slots(); })
        .def_prop_ro("n_vocab", [](PyStepLoop& s) { return s.get()->desc().n_vocab; })
        .def("shutdown", [](PyStepLoop& s) {
            std::shared_ptr<StepLoop> l = s.loop;
            if (!l) return;
            nb::gil_scoped_release nogil;
            l->shutdown();
        }, "Ends every live request (each gets its terminal event, still readable) and stops the thread.")
        .def("close", [](PyStepLoop& s) {
            std::shared_ptr<StepLoop> l = std::move(s.loop);
            if (!l) return;
            {
                nb::gil_scoped_release nogil;
                l->shutdown();
                l.reset();  // the engine goes with the last reference
            }
            s.mask_fns.clear();  // the thread is gone: nothing calls them any more
        }, "shutdown() and let go of the engine; the object is unusable afterwards.");
}

}  // namespace orcd
