// zeroed_buffer.h - a large float array whose pages are committed on first
// touch and can be given back, for the CPU engine's KV cache.
//
// An anonymous private mapping reads as zero and takes no physical memory until
// written, so a cache sized for a long context or many slots costs nothing up front
// (std::vector::assign would write every byte: seconds and gigabytes for n_ctx in the
// 100k range). MAP_NORESERVE: the engine bounds what it commits by its KV pool
// (kv_pool.h), not by the address space. discard() returns a range's whole pages to
// the system (madvise MADV_DONTNEED): they read as zero again.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <utility>

namespace orcd {

class ZeroedBuffer {
public:
    ZeroedBuffer() = default;
    // Throws std::bad_alloc if the system refuses the address space.
    explicit ZeroedBuffer(size_t n) : n_(n) {
        bytes_ = (n ? n : 1) * sizeof(float);
        void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) throw std::bad_alloc();
        p_ = static_cast<float*>(p);
    }
    ZeroedBuffer(ZeroedBuffer&& o) noexcept { swap(o); }
    ZeroedBuffer& operator=(ZeroedBuffer&& o) noexcept {
        ZeroedBuffer(std::move(o)).swap(*this);
        return *this;
    }
    ZeroedBuffer(const ZeroedBuffer&) = delete;
    ZeroedBuffer& operator=(const ZeroedBuffer&) = delete;
    ~ZeroedBuffer() {
        if (p_) munmap(p_, bytes_);
    }

    float* data() { return p_; }
    const float* data() const { return p_; }
    size_t size() const { return n_; }
    float& operator[](size_t i) { return p_[i]; }
    const float& operator[](size_t i) const { return p_[i]; }

    // Gives back the pages wholly inside elements [first, first + n); the elements of
    // partial pages at the ends keep their values.
    void discard(size_t first, size_t n) {
        if (!p_ || n == 0) return;
        const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
        const uintptr_t b = reinterpret_cast<uintptr_t>(p_ + first), e = reinterpret_cast<uintptr_t>(p_ + first + n);
        const uintptr_t lo = (b + page - 1) / page * page, hi = e / page * page;
        if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
    }

private:
    void swap(ZeroedBuffer& o) noexcept {
        std::swap(p_, o.p_);
        std::swap(n_, o.n_);
        std::swap(bytes_, o.bytes_);
    }
    float* p_ = nullptr;
    size_t n_ = 0, bytes_ = 0;
};

}  // namespace orcd
