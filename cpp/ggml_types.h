// ggml_types.h - the tensor element types a GGUF file can name.
//
// Type ids, block sizes and block byte sizes follow ggml's `enum ggml_type`
// (ggml.h). The reader knows every type so it can check any file's tensor
// sizes; `dequantizable` marks the ones orcd can turn into floats.
#pragma once
#include <cstddef>
#include <cstdint>

namespace orcd {

enum GGType : uint32_t {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7,
    T_Q8_0 = 8, T_Q8_1 = 9, T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12,
    T_Q5_K = 13, T_Q6_K = 14, T_Q8_K = 15, T_BF16 = 30, T_MXFP4 = 39,
};

struct TypeInfo {
    uint32_t id;          // ggml type id as stored in the file
    const char* name;     // "Q4_K", as ggml and the gguf package spell it
    int64_t block_size;   // elements per block (1 for plain float/int types)
    int64_t block_bytes;  // bytes per block
    bool dequantizable;   // orcd can dequantize it to float32
};

// nullptr when the id is not a known ggml type.
const TypeInfo* type_info(uint32_t id);
// Name for messages; "type#<id>" for unknown ids (static storage not needed by callers).
const char* type_name(uint32_t id);

}  // namespace orcd
