// resident_f16.cu - ResidentF16: the fp16 copy's size and contents.
#include <initializer_list>
#include <string>
#include <vector>

#include "ggml_types.h"
#include "kernels.cuh"
#include "resident_f16.cuh"

namespace orcd {
namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

size_t ResidentF16::bytes_for(const ModelDesc& d) {
    size_t total = 0;
    auto group = [&](std::initializer_list<const TensorInfo*> ts) {
        bool all_f16 = true;
        size_t elems = 0;
        for (const TensorInfo* t : ts)
            if (!t) return;  // gpt-oss: no dense FFN (its experts are read as stored)
        for (const TensorInfo* t : ts) {
            all_f16 = all_f16 && t->type == T_F16;
            elems += size_t(t->n_elements());
        }
        if (!all_f16) total += align_up(elems * 2);
    };
    for (const LayerDesc& L : d.layers) {  // a fused attn_qkv / ffn_up is its group whole
        if (L.wqkv) group({L.wqkv});
        else group({L.wq, L.wk, L.wv});
        group({L.wo});
        if (L.w_gate_up) group({L.w_gate_up});
        else group({L.w_gate, L.w_up});
        group({L.w_down});
    }
    group({d.output});
    return total;
}

void ResidentF16::build(const DeviceWeights& w, __half* buf, size_t bytes, cudaStream_t stream) {
    at_.clear();
    size_t off = 0;  // in halfs
    auto group = [&](std::initializer_list<const DevWeight*> ws) {
        bool in_place = true;
        const uint8_t* expect = nullptr;
        for (const DevWeight* x : ws)
            if (!x->data) return;  // as in plan: no such matrix
        for (const DevWeight* x : ws) {
            if (x->type != T_F16 || (expect && x->data != expect)) in_place = false;
            expect = x->data + x->bytes();
        }
        if (in_place) return;
        size_t elems = 0;
        for (const DevWeight* x : ws) elems += size_t(x->elems());
        if ((off + elems) * 2 > bytes)  // F16 groups that are not adjacent on the device: no room planned
            return;
        size_t o = off;
        for (const DevWeight* x : ws) {
            cu::dequantize_f16(x->type, x->data, x->elems(), buf + o, stream, x->name.c_str());
            at_[x->data] = buf + o;
            o += size_t(x->elems());
        }
        off += align_up(elems * 2) / 2;
    };
    for (const DevLayer& L : w.layers) {
        group({&L.wq, &L.wk, &L.wv});
        group({&L.wo});
        group({&L.gate, &L.up});
        group({&L.down});
    }
    group({&w.output});
}

}  // namespace orcd
