// bind_numpy.h - handing C++ buffers to NumPy without copies, for the
// nanobind modules (cpp/bindings.cpp, cpp/bind_engine.h).
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstddef>
#include <utility>
#include <vector>

namespace orcd {

template <typename T>
using NpArray = nanobind::ndarray<nanobind::numpy, T>;

// A 1-D int32 (or other) array argument: C-contiguous, on the CPU; nanobind
// converts other dtypes and layouts when it can and rejects other ranks.
template <typename T>
using In1D = nanobind::ndarray<const T, nanobind::ndim<1>, nanobind::c_contig, nanobind::device::cpu>;
template <typename T>
using In2D = nanobind::ndarray<const T, nanobind::ndim<2>, nanobind::c_contig, nanobind::device::cpu>;

// Hands a heap vector to NumPy without copying; the capsule frees it.
template <typename T>
NpArray<T> to_numpy(std::vector<T>&& v, std::vector<size_t> shape) {
    auto* heap = new std::vector<T>(std::move(v));
    nanobind::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
    return NpArray<T>(heap->data(), shape.size(), shape.data(), owner);
}

// A fresh float32 NumPy array of `shape` whose memory is not zero-filled:
// for outputs a kernel overwrites completely (logits, dequantized tensors).
struct FloatOut {
    float* data;
    NpArray<float> array;
};
inline FloatOut float_out(std::vector<size_t> shape) {
    size_t n = 1;
    for (size_t d : shape) n *= d;
    float* p = new float[n ? n : 1];  // default-initialised: no page-touching zero fill
    nanobind::capsule owner(p, [](void* q) noexcept { delete[] static_cast<float*>(q); });
    return {p, NpArray<float>(p, shape.size(), shape.data(), owner)};
}

}  // namespace orcd
