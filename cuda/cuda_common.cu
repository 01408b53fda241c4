// cuda_common.cu - error messages, cuda_status() and device_info().
#include <mutex>
#include <string>

#include "cuda_common.cuh"
#include "kernels.cuh"

namespace orcd {

void throw_cuda(const char* call, cudaError_t e, const std::string& what) {
    cudaGetLastError();  // a non-sticky error must not resurface in the next launch check
    throw CudaError(std::string(call) + " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e) + " (" +
                    what + ")");
}

namespace {

const char* cublas_status_string(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
    }
}

}  // namespace

void throw_cublas(const char* call, cublasStatus_t s, const std::string& what) {
    throw CudaError(std::string(call) + " failed: " + cublas_status_string(s) + " (" + what + ")");
}

namespace {

std::string compute_status() {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaErrorInsufficientDriver)
        return std::string("no usable NVIDIA driver: ") + cudaGetErrorString(e);
    if (e == cudaErrorNoDevice || (e == cudaSuccess && n == 0)) return "no CUDA device found";
    if (e != cudaSuccess) return std::string("CUDA unavailable: cudaGetDeviceCount: ") + cudaGetErrorString(e);
    cudaDeviceProp p{};
    e = cudaGetDeviceProperties(&p, 0);
    if (e != cudaSuccess) return std::string("CUDA unavailable: cudaGetDeviceProperties: ") + cudaGetErrorString(e);
    e = cu::probe_kernel();
    if (e != cudaSuccess) {
        cudaGetLastError();  // clear a sticky launch error where possible
        return std::string("cannot run orcd's kernels on ") + p.name + " (compute capability " +
               std::to_string(p.major) + "." + std::to_string(p.minor) + "): " + cudaGetErrorString(e) +
               "; rebuild with CMAKE_CUDA_ARCHITECTURES=" + std::to_string(p.major) + std::to_string(p.minor);
    }
    return "";
}

}  // namespace

std::string cuda_status() {
    static std::once_flag once;
    static std::string status;
    std::call_once(once, [] { status = compute_status(); });
    return status;
}

DeviceInfo device_info(int device) {
    const std::string st = cuda_status();
    if (!st.empty()) throw CudaError("CUDA backend unavailable: " + st);
    int n = 0;
    CUDA_CHECK(cudaGetDeviceCount(&n), "device_info");
    if (device < 0 || device >= n)
        throw Error("CUDA device " + std::to_string(device) + " out of range (" + std::to_string(n) + " devices)");
    cudaDeviceProp p{};
    CUDA_CHECK(cudaGetDeviceProperties(&p, device), "device " + std::to_string(device));
    DeviceInfo d;
    d.device = device;
    d.name = p.name;
    d.cc_major = p.major;
    d.cc_minor = p.minor;
    d.sm_count = p.multiProcessorCount;
    d.l2_bytes = size_t(p.l2CacheSize);
    d.total_mem = p.totalGlobalMem;
    CUDA_CHECK(cudaSetDevice(device), "device " + std::to_string(device));
    size_t fr = 0, tot = 0;
    CUDA_CHECK(cudaMemGetInfo(&fr, &tot), "device " + std::to_string(device));
    d.free_mem = fr;
    d.total_mem = tot;
    CUDA_CHECK(cudaDriverGetVersion(&d.driver_version), "device_info");
    CUDA_CHECK(cudaRuntimeGetVersion(&d.runtime_version), "device_info");
    return d;
}

}  // namespace orcd
