// batch_graph.cuh - the multi-sequence decode step's CUDA graphs: the buckets a step is
// padded to, and a bounded cache of instantiated graphs (least recently used out).
//
// A step of n sequences runs as row_bucket(n) rows (the rows past n repeat the last real
// row: same token, slot and position, so they write the same K/V values to the same
// place) over a cache of kv_bucket(kv_max) positions (attention masks each query by its
// own position, so a longer plan only adds idle splits). Its launches then depend on the
// bucket pair alone, and the graph captured for a pair is replayed for every later step
// of that pair; the ids live in fixed device buffers the graph reads.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace orcd {

// Graphs a cache holds at most: each is one step's ~15 nodes per layer.
constexpr int kBatchGraphsMax = 64;
// The smallest cache bucket (the attention's splits are multiples of 256 keys).
constexpr int kBatchKvMin = 256;

// The smallest of 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, ... that holds
// n rows, at most cap (cap >= n >= 1).
int batch_row_bucket(int n, int cap);
// The smallest power of two >= kv (at least kBatchKvMin), at most n_ctx (n_ctx >= kv >= 1).
int batch_kv_bucket(int kv, int n_ctx);

class BatchGraphCache {
public:
    BatchGraphCache() = default;
    BatchGraphCache(const BatchGraphCache&) = delete;
    BatchGraphCache& operator=(const BatchGraphCache&) = delete;
    ~BatchGraphCache() { clear(); }

    static uint64_t key(bool matvec, int rows, int kv) {
        return (uint64_t(matvec) << 63) | (uint64_t(uint32_t(rows)) << 32) | uint64_t(uint32_t(kv));
    }
    // The graph of `key` (marked used now), or null.
    cudaGraphExec_t find(uint64_t key);
    // True the first time a key is asked about: that step runs uncaptured (lazy module
    // loading and cuBLAS's first calls happen outside a capture), the next one captures.
    bool first_use(uint64_t key);
    // Stores g under key; at capacity the least recently used graph is destroyed first
    // (after `stream` drains: it may still be running).
    void put(uint64_t key, cudaGraphExec_t g, cudaStream_t stream);
    void clear() noexcept;  // destroys every graph (the stream is idle)
    int size() const { return int(entries_.size()); }

private:
    struct Entry {
        uint64_t key;
        cudaGraphExec_t exec;
        uint64_t used;
    };
    std::vector<Entry> entries_;
    std::vector<uint64_t> seen_;
    uint64_t clock_ = 0;
};

// The stream work of `body` as an instantiated graph; a failed capture is ended and
// cleaned up before the error (orcd::CudaError) propagates.
cudaGraphExec_t record_stream_graph(cudaStream_t stream, const std::function<void()>& body, const char* what);

}  // namespace orcd
