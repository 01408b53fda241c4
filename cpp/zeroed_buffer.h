// zeroed_buffer.h - a large float array whose pages are committed on first
// touch, for the CPU engine's KV cache.
//
// calloc hands big requests to mmap, whose pages read as zero and take no
// physical memory until written, so a cache sized for a long context costs
// nothing up front (std::vector::assign would write every byte: seconds and
// gigabytes for n_ctx in the 100k range). Positions the engine has not
// written read as 0.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace orcd {

class ZeroedBuffer {
public:
    ZeroedBuffer() = default;
    // Throws std::bad_alloc if the system refuses the address space.
    explicit ZeroedBuffer(size_t n) : p_((float*)std::calloc(n ? n : 1, sizeof(float))), n_(n) {
        if (!p_) throw std::bad_alloc();
    }
    float* data() { return p_.get(); }
    const float* data() const { return p_.get(); }
    size_t size() const { return n_; }
    float& operator[](size_t i) { return p_.get()[i]; }
    const float& operator[](size_t i) const { return p_.get()[i]; }

private:
    struct Free {
        void operator()(float* p) const { std::free(p); }
    };
    std::unique_ptr<float, Free> p_;
    size_t n_ = 0;
};

}  // namespace orcd
