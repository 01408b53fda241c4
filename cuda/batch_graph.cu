// batch_graph.cu - buckets and the graph cache of the multi-sequence decode step.
#include <algorithm>

#include "batch_graph.cuh"
#include "cuda_common.cuh"

namespace orcd {

int batch_row_bucket(int n, int cap) {
    // powers of two up to 16, then 1.5x steps: at most a third of a step is padding
    int b = 1;
    while (b < n) {
        if (b < 16) b *= 2;
        else if ((b & (b - 1)) == 0) b += b / 2;  // 16 -> 24, 32 -> 48, ...
        else b = b / 3 * 4;                       // 24 -> 32, 48 -> 64, ...
    }
    return std::max(n, std::min(b, cap));
}

int batch_kv_bucket(int kv, int n_ctx) {
    int b = kBatchKvMin;
    while (b < kv) b *= 2;
    return std::max(kv, std::min(b, n_ctx));
}

cudaGraphExec_t BatchGraphCache::find(uint64_t key) {
    for (Entry& e : entries_)
        if (e.key == key) {
            e.used = ++clock_;
            return e.exec;
        }
    return nullptr;
}

bool BatchGraphCache::first_use(uint64_t key) {
    if (std::find(seen_.begin(), seen_.end(), key) != seen_.end()) return false;
    if (seen_.size() >= size_t(8 * kBatchGraphsMax)) seen_.clear();  // bounded; a forgotten key runs once more uncaptured
    seen_.push_back(key);
    return true;
}

void BatchGraphCache::put(uint64_t key, cudaGraphExec_t g, cudaStream_t stream) {
    if (entries_.size() >= size_t(kBatchGraphsMax)) {
        auto lru = std::min_element(entries_.begin(), entries_.end(),
                                    [](const Entry& a, const Entry& b) { return a.used < b.used; });
        CUDA_CHECK(cudaStreamSynchronize(stream), "batch graph eviction");
        cudaGraphExecDestroy(lru->exec);
        entries_.erase(lru);
    }
    entries_.push_back({key, g, ++clock_});
}

void BatchGraphCache::clear() noexcept {
    for (Entry& e : entries_)
        if (e.exec) cudaGraphExecDestroy(e.exec);
    entries_.clear();
    seen_.clear();
}

cudaGraphExec_t record_stream_graph(cudaStream_t stream, const std::function<void()>& body, const char* what) {
    cudaGraph_t graph = nullptr;
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), what);
    try {
        body();
    } catch (...) {
        cudaStreamEndCapture(stream, &graph);
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph), what);
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) throw_cuda("cudaGraphInstantiate", e, what);
    return exec;
}

}  // namespace orcd
