# Finds nvcc and cuBLAS and builds the orcd_cuda library from cuda/.
# cuBLAS may come from the CUDA toolkit or from the `nvidia-cublas` wheel
# (site-packages/nvidia/cu13), which is how machines without a full toolkit
# get it. Sets ORCD_HAVE_CUDA, and ORCD_CUBLAS_RPATH (the build-time folder of
# the wheel's libcublas) when the wheel is used.
include(CheckLanguage)
check_language(CUDA)
set(_why "")
if(NOT CMAKE_CUDA_COMPILER)
  set(_why "no CUDA compiler (nvcc) found")
else()
  find_package(CUDAToolkit QUIET)
  if(NOT CUDAToolkit_FOUND)
    set(_why "CUDA toolkit not found")
  endif()
endif()

set(_cublas_target "")
if(_why STREQUAL "")
  if(TARGET CUDA::cublas AND EXISTS "${CUDAToolkit_LIBRARY_DIR}/libcublas.so")
    set(_cublas_target CUDA::cublas)
  else()
    # The nvidia-cublas wheel: look in this Python's site-packages.
    find_package(Python 3.9 QUIET COMPONENTS Interpreter)
    if(Python_EXECUTABLE)
      execute_process(COMMAND "${Python_EXECUTABLE}" -c
        "import nvidia, os; print(';'.join(os.path.join(p, d) for p in nvidia.__path__ for d in ('cu13', 'cu12', 'cublas')))"
        OUTPUT_VARIABLE _nv_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    endif()
    foreach(_d IN LISTS _nv_dirs)
      if(NOT _cublas_target AND EXISTS "${_d}/include/cublas_v2.h")
        file(GLOB _libs "${_d}/lib/libcublas.so*")
        list(FILTER _libs EXCLUDE REGEX "Lt")
        if(_libs)
          list(GET _libs 0 _lib)
          add_library(orcd_cublas SHARED IMPORTED)
          set_target_properties(orcd_cublas PROPERTIES IMPORTED_LOCATION "${_lib}"
                                INTERFACE_INCLUDE_DIRECTORIES "${_d}/include")
          set(_cublas_target orcd_cublas)
          set(ORCD_CUBLAS_RPATH "${_d}/lib")
        endif()
      endif()
    endforeach()
    if(NOT _cublas_target)
      set(_why "cuBLAS not found (install the CUDA toolkit's cuBLAS or `pip install nvidia-cublas`)")
    endif()
  endif()
endif()

if(NOT _why STREQUAL "")
  if(ORCD_CUDA STREQUAL "ON")
    message(FATAL_ERROR "ORCD_CUDA=ON but ${_why}")
  endif()
  message(STATUS "orcd: skipping the CUDA backend: ${_why}")
  return()
endif()

# GPU architectures (ORCD_CUDA_ARCHS, CMakeLists.txt): an explicit
# CMAKE_CUDA_ARCHITECTURES wins; else "auto" is this machine's GPU when
# nvidia-smi sees one (a quick single-architecture build) and the wheel set
# otherwise; "all" is the wheel set: machine code for sm_80 (A100), sm_86
# (RTX 30xx, A10/A40), sm_89 (RTX 40xx, L4/L40), sm_90 (H100/H200), sm_100
# (B200) and sm_120 (RTX 50xx), plus compute_120 PTX that the driver compiles
# for newer GPUs; "native" is this machine's GPU or an error; anything else is
# taken as a CMAKE_CUDA_ARCHITECTURES list ("90", "89;90-real").
set(_orcd_all_archs 80-real 86-real 89-real 90-real 100-real 120)
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(_archs "${ORCD_CUDA_ARCHS}")
  if(_archs STREQUAL "auto" OR _archs STREQUAL "native")
    execute_process(COMMAND nvidia-smi --query-gpu=compute_cap --format=csv,noheader
                    OUTPUT_VARIABLE _cc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
    if(_rc EQUAL 0 AND _cc)
      string(REGEX MATCH "^[0-9]+\\.[0-9]+" _cc "${_cc}")
      string(REPLACE "." "" _archs "${_cc}")
    elseif(_archs STREQUAL "native")
      message(FATAL_ERROR "ORCD_CUDA_ARCHS=native but nvidia-smi finds no GPU here")
    else()
      set(_archs all)
    endif()
  endif()
  if(_archs STREQUAL "all")
    set(_archs ${_orcd_all_archs})
  endif()
  set(CMAKE_CUDA_ARCHITECTURES ${_archs})
endif()
enable_language(CUDA)
message(STATUS "orcd: CUDA architectures ${CMAKE_CUDA_ARCHITECTURES}")

file(GLOB ORCD_CUDA_SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/cuda/*.cu)
add_library(orcd_cuda STATIC ${ORCD_CUDA_SOURCES})
target_include_directories(orcd_cuda PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/cuda)
target_link_libraries(orcd_cuda PUBLIC orcd_core CUDA::cudart_static ${_cublas_target})
set_target_properties(orcd_cuda PROPERTIES CUDA_SEPARABLE_COMPILATION OFF)
target_compile_options(orcd_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo>)
set(ORCD_HAVE_CUDA ON)
set_target_properties(orcd_cuda PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
