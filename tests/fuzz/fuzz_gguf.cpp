// fuzz_gguf.cpp - libFuzzer target: everything orcd does with an untrusted
// GGUF image before and at the first token.
//
// Parse (GGUFFile::from_bytes) -> every metadata value -> dequantize every
// tensor -> describe_model -> CpuEngine construction -> one two-token
// forward. orcd::Error is the expected outcome for bad input; anything else
// (a crash, a sanitizer report, another exception type, a hang) is a finding.
// Bounds keep one input cheap: tensors over kMaxElements are not dequantized
// and models over kMaxWeights are not run.
//
// Built as `orcd_fuzz_gguf` (clang, -DORCD_FUZZ=ON) and, with replay_main.cpp,
// as `orcd_fuzz_gguf_replay`, which the test suite runs over corpus/gguf and
// regressions/gguf.
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "engine.h"
#include "error.h"
#include "gguf.h"
#include "model.h"
#include "quants.h"

namespace {

constexpr int64_t kMaxElements = 1 << 22;  // 16 MiB of float output per tensor
constexpr uint64_t kMaxWeights = 1 << 20;  // model bytes we are willing to run a forward on

// Reads every byte a metadata value points at, so a bad pointer shows.
uint64_t touch(const orcd::Value& v) {
    uint64_t h = (uint64_t)v.type + v.num.u;
    for (char c : v.str) h = h * 31 + (unsigned char)c;
    if (v.raw) {
        size_t es = v.elem == orcd::VT::U8 || v.elem == orcd::VT::I8 || v.elem == orcd::VT::BOOL ? 1
                  : v.elem == orcd::VT::U16 || v.elem == orcd::VT::I16 ? 2
                  : v.elem == orcd::VT::U64 || v.elem == orcd::VT::I64 || v.elem == orcd::VT::F64 ? 8 : 4;
        for (uint64_t k = 0; k < v.count * es; ++k) h = h * 31 + v.raw[k];
    }
    for (std::string_view s : v.strs)
        for (char c : s) h = h * 31 + (unsigned char)c;
    for (const orcd::Value& item : v.items) h += touch(item);
    return h;
}

void run(const uint8_t* data, size_t size) {
    std::shared_ptr<orcd::GGUFFile> f(orcd::GGUFFile::from_bytes(data, size, "fuzz.gguf"));
    volatile uint64_t sink = 0;
    for (const auto& [key, value] : f->metadata()) sink = sink + key.size() + touch(value);
    std::vector<float> out;
    uint64_t total = 0;
    for (const orcd::TensorInfo& t : f->tensors()) {
        total += t.nbytes;
        if (!orcd::can_dequantize(t.type) || t.n_elements() > kMaxElements) continue;
        out.resize((size_t)t.n_elements());
        orcd::dequantize_rows(t, 0, t.n_rows(), out.data());
        uint32_t bits;
        std::memcpy(&bits, out.data(), 4);  // the floats may be anything: read bits, not values
        sink = sink + bits;
    }
    orcd::ModelDesc d = orcd::describe_model(*f);
    if (total > kMaxWeights) return;
    auto engine = orcd::make_cpu_engine(f, 8, 1, 1);
    std::vector<float> logits((size_t)d.n_vocab);
    const int32_t tokens[2] = {0, d.n_vocab - 1};
    engine->forward(0, tokens, 2, 0, logits.data(), false, nullptr);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
        run(data, size);
    } catch (const orcd::Error&) {
        // rejected with a message: the expected outcome for bad input
    }
    return 0;
}
