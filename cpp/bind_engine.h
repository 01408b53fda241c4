// bind_engine.h - the Python methods every engine class has, written once for
// orcd._orcd.CpuEngine (cpp/bindings.cpp) and orcd._orcd_cuda.CudaEngine
// (cuda/bindings_cuda.cpp):
//   .forward(slot, tokens int32[n], pos0, all_logits=False) -> float32 [n_vocab] | [n, n_vocab]
//   .trace(tokens) -> (list of float32 [n, n_embd] x (n_layer+1), float32 [n, n_vocab])
//   .decode_batch(slots, tokens, pos) -> float32 [n, n_vocab]
//   .forward_rows(slots, tokens, pos, out_rows) -> float32 [len(out_rows), n_vocab]
//   .decode_greedy(slot, first_token, pos, n_steps) -> int32 [n_steps]
//   .kv_reserve(slot, n_positions) -> bool, .kv_release(slot), .kv_reserved(slot) -> int
//   .info() -> dict (kv_pool_positions / kv_pool_reserved / kv_pool_largest_free / kv_pool_unit)
//   .close()
// Calls into one engine are serialised by its lock (its KV cache and scratch
// serve one caller at a time; Python threads may share a Model); the GIL is
// released while the engine runs. Bad arguments raise orcd::Error from
// engine.h's checks, so the messages are the same for every backend.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "bind_logprobs.h"
#include "bind_numpy.h"
#include "engine.h"
#include "error.h"

namespace orcd {

// The Python object behind an engine class: the engine (null once closed) and its lock.
template <class E>
struct EngineHolder {
    std::unique_ptr<E> e;
    std::unique_ptr<std::mutex> mu = std::make_unique<std::mutex>();

    E& get() {
        if (!e) throw Error("engine is closed");
        return *e;
    }
};

namespace bind_detail {
// The arguments are copied before the GIL is released: another Python thread
// could change a NumPy array while the engine reads it, after the checks.
inline std::vector<int32_t> ids(const In1D<int32_t>& a) { return std::vector<int32_t>(a.data(), a.data() + a.shape(0)); }
}  // namespace bind_detail

// Adds the methods above to `cls` (a nanobind::class_<EngineHolder<E>>);
// info(engine) -> nanobind::dict supplies .info().
template <class E, class Cls, class InfoFn>
void bind_engine_methods(Cls& cls, InfoFn info) {
    namespace nb = nanobind;
    using H = EngineHolder<E>;
    cls.def(
           "forward",
           [](H& self, int slot, In1D<int32_t> tokens, int pos0, bool all_logits) {
               const std::vector<int32_t> tok = bind_detail::ids(tokens);
               const int n = int(tok.size());
               const size_t V = size_t(self.get().desc().n_vocab);
               FloatOut out = all_logits ? float_out({size_t(n), V}) : float_out({V});
               {
                   nb::gil_scoped_release nogil;
                   std::lock_guard<std::mutex> lock(*self.mu);
                   self.get().forward(slot, tok.data(), n, pos0, out.data, all_logits, nullptr);
               }
               return out.array;
           },
           nb::arg("slot"), nb::arg("tokens"), nb::arg("pos0"), nb::arg("all_logits") = false)
        .def(
            "trace",
            [](H& self, In1D<int32_t> tokens, bool all_logits) {
                const std::vector<int32_t> tok = bind_detail::ids(tokens);
                const int n = int(tok.size());
                const size_t V = size_t(self.get().desc().n_vocab);
                const size_t lrows = all_logits ? size_t(n) : 1;  // a long prompt: the last row's only
                std::vector<float> logits(lrows * V);
                Trace tr;
                {
                    nb::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(*self.mu);
                    self.get().forward(0, tok.data(), n, 0, logits.data(), all_logits, &tr);
                }
                nb::list hidden;
                for (auto& h : tr.hidden) hidden.append(to_numpy(std::move(h), {size_t(n), size_t(tr.n_embd)}));
                return nb::make_tuple(hidden, to_numpy(std::move(logits), {lrows, V}));
            },
            nb::arg("tokens"), nb::arg("all_logits") = true,
            "(hidden states after the embedding and each layer [n, n_embd], logits [n, n_vocab]) of a prompt "
            "from position 0 of slot 0; all_logits=False: the last row's logits only ([1, n_vocab]).")
        .def(
            "decode_batch",
            [](H& self, In1D<int32_t> slots, In1D<int32_t> tokens, In1D<int32_t> pos) {
                const std::vector<int32_t> s = bind_detail::ids(slots), t = bind_detail::ids(tokens),
                                           p = bind_detail::ids(pos);
                if (s.size() != t.size() || s.size() != p.size())
                    throw Error("decode_batch: slots, tokens and pos must have the same length");
                const size_t V = size_t(self.get().desc().n_vocab);
                FloatOut out = float_out({s.size(), V});
                {
                    nb::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(*self.mu);
                    self.get().decode_batch(int(s.size()), s.data(), t.data(), p.data(), out.data);
                }
                return out.array;
            },
            nb::arg("slots"), nb::arg("tokens"), nb::arg("pos"))
        .def(
            "forward_rows",
            [](H& self, In1D<int32_t> slots, In1D<int32_t> tokens, In1D<int32_t> pos, In1D<int32_t> out_rows) {
                const std::vector<int32_t> s = bind_detail::ids(slots), t = bind_detail::ids(tokens),
                                           p = bind_detail::ids(pos), o = bind_detail::ids(out_rows);
                if (s.size() != t.size() || s.size() != p.size())
                    throw Error("forward_rows: slots, tokens and pos must have the same length");
                const size_t V = size_t(self.get().desc().n_vocab);
                FloatOut out = float_out({o.size(), V});
                {
                    nb::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(*self.mu);
                    self.get().forward_rows(int(s.size()), s.data(), t.data(), p.data(), int(o.size()), o.data(),
                                            out.data);
                }
                return out.array;
            },
            nb::arg("slots"), nb::arg("tokens"), nb::arg("pos"), nb::arg("out_rows"),
            "Prompt chunks of several slots in one pass (row i: tokens[i] at pos[i] of slots[i]); the logits\n"
            "of the rows listed in out_rows.")
        .def(
            "decode_greedy",
            [](H& self, int slot, int32_t first_token, int pos, int n_steps) {
                // checked here too: n_steps sizes the output before the engine sees it
                check_greedy_args("decode_greedy", self.get(), slot, first_token, pos, n_steps);
                std::vector<int32_t> out(static_cast<size_t>(n_steps));
                {
                    nb::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(*self.mu);
                    self.get().decode_greedy(slot, first_token, pos, n_steps, out.data());
                }
                return to_numpy(std::move(out), {size_t(n_steps)});
            },
            nb::arg("slot"), nb::arg("first_token"), nb::arg("pos"), nb::arg("n_steps"),
            "Greedy decoding: step i evaluates t_i at pos+i (t_0 = first_token) and returns t_{i+1} "
            "(llama-bench's tg: no sampling).")
        .def(
            "decode_sample",
            [](H& self, int slot, int32_t token, int pos, nb::tuple params, uint64_t rng_state,
               In1D<int32_t> history, int n_logprobs, std::optional<In1D<uint32_t>> mask) -> nb::object {
                if (params.size() != 8)
                    throw Error("decode_sample: params are (temperature, top_k, top_p, min_p, repetition_penalty, "
                                "presence_penalty, frequency_penalty, penalty_last_n)");
                DeviceSampleRow row;
                row.params.temperature = nb::cast<float>(params[0]);
                row.params.top_k = nb::cast<int>(params[1]);
                row.params.top_p = nb::cast<float>(params[2]);
                row.params.min_p = nb::cast<float>(params[3]);
                row.params.repetition_penalty = nb::cast<float>(params[4]);
                row.params.presence_penalty = nb::cast<float>(params[5]);
                row.params.frequency_penalty = nb::cast<float>(params[6]);
                row.params.penalty_last_n = nb::cast<int>(params[7]);
                row.rng_state = rng_state;
                const std::vector<int32_t> h = bind_detail::ids(history);
                row.history = h.data();
                row.n_history = int(h.size());
                Logprobs lp;
                if (n_logprobs >= 0) {
                    if (n_logprobs > kMaxTopLogprobs)
                        throw Error("decode_sample: n_logprobs must be in [-1, " + std::to_string(kMaxTopLogprobs) +
                                    "] (got " + std::to_string(n_logprobs) + ")");
                    row.n_logprobs = n_logprobs;
                    row.logprobs = &lp;
                }
                if (mask) {
                    const int words = token_mask_words(self.get().desc().n_vocab);
                    if (int(mask->shape(0)) != words)
                        throw Error("decode_sample: the mask must be uint32[" + std::to_string(words) + "] (got " +
                                    std::to_string(mask->shape(0)) + " words)");
                    row.mask = mask->data();
                }
                int32_t out = -1;
                bool done;
                {
                    nb::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(*self.mu);
                    done = self.get().decode_batch_sample(1, &slot, &token, &pos, &row, &out);
                }
                if (!done) return nb::none();
                if (n_logprobs >= 0) return nb::make_tuple(out, row.rng_state, logprobs_to_py(lp));
                return nb::make_tuple(out, row.rng_state);
            },
            nb::arg("slot"), nb::arg("token"), nb::arg("pos"), nb::arg("params"), nb::arg("rng_state"),
            nb::arg("history"), nb::arg("n_logprobs") = -1, nb::arg("mask") = nb::none(),
            "One decode step of `slot` (token at pos) with the next token sampled on the engine's device:\n"
            "(token, generator state after the draw), or None where the engine cannot (the CPU engine, or\n"
            "parameters beyond the device sampler): then forward() and Sampler.sample.\n"
            "n_logprobs >= 0 (up to 20): a third item, the token's (logprob, [(id, logprob), ...] top\n"
            "n_logprobs) under the raw distribution (cpp/logprobs.h), computed next to the logits.\n"
            "mask: structured output's allowed tokens, uint32[token_mask_words(n_vocab)] (bit t % 32 of\n"
            "mask[t / 32]), applied after the logprobs and before the sampling chain.")
        .def(
            "kv_reserve",
            [](H& self, int slot, int n_positions) {
                nb::gil_scoped_release nogil;
                std::lock_guard<std::mutex> lock(*self.mu);
                return self.get().kv_reserve(slot, n_positions);
            },
            nb::arg("slot"), nb::arg("n_positions"),
            "Makes `slot` hold positions [0, n_positions) of the KV pool (its cached positions stay);\n"
            "False, changing nothing, when the pool has no free range that long.")
        .def(
            "kv_release",
            [](H& self, int slot) {
                nb::gil_scoped_release nogil;
                std::lock_guard<std::mutex> lock(*self.mu);
                self.get().kv_release(slot);
            },
            nb::arg("slot"), "Gives the slot's KV memory back to the pool: its cached positions are gone.")
        .def(
            "kv_reserved",
            [](H& self, int slot) {
                std::lock_guard<std::mutex> lock(*self.mu);
                return self.get().kv_reserved(slot);
            },
            nb::arg("slot"), "Positions the slot holds in the KV pool now.")
        .def(
            "decode_sample_steps",
            [](H& self, int slot, int32_t token, int pos, int n_steps, nb::tuple params, uint64_t rng_state)
                -> nb::object {
                if (params.size() != 8)
                    throw Error("decode_sample_steps: params are (temperature, top_k, top_p, min_p, "
                                "repetition_penalty, presence_penalty, frequency_penalty, penalty_last_n)");
                check_greedy_args("decode_sample_steps", self.get(), slot, token, pos, n_steps);
                DeviceSampleRow row;
                row.params = SamplerParams{nb::cast<float>(params[0]), nb::cast<int>(params[1]),
                                           nb::cast<float>(params[2]), nb::cast<float>(params[3]),
                                           nb::cast<float>(params[4]), nb::cast<float>(params[5]),
                                           nb::cast<float>(params[6]), nb::cast<int>(params[7]), 0};
                row.rng_state = rng_state;
                std::vector<int32_t> out(static_cast<size_t>(n_steps));
                bool done;
                {
                    nb::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(*self.mu);
                    done = self.get().decode_sample_steps(slot, token, pos, n_steps, row, out.data());
                }
                if (!done) return nb::none();
                return nb::make_tuple(to_numpy(std::move(out), {size_t(n_steps)}), row.rng_state);
            },
            nb::arg("slot"), nb::arg("token"), nb::arg("pos"), nb::arg("n_steps"), nb::arg("params"),
            nb::arg("rng_state"),
            "n_steps steps of `slot` from (token, pos), each next token sampled on the engine's device and fed\n"
            "to the next step: (int32 tokens [n_steps], generator state after the last draw), or None where the\n"
            "engine cannot (the CPU engine, penalties, parameters beyond the device sampler).")
        .def("info", [info](H& self) { return info(self.get()); })
        .def("close", [](H& self) {
            nb::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lock(*self.mu);
            self.e.reset();
        });
}

}  // namespace orcd
