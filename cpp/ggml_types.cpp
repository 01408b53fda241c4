// ggml_types.cpp - the table behind type_info().
#include "ggml_types.h"

#include "block_formats.h"

namespace orcd {

// The types orcd decodes take their sizes from block_formats.h (the layouts
// the kernels use); the others are listed only so files holding them can be
// checked and named.
template <uint32_t T>
constexpr TypeInfo decoded(const char* name) {
    return {T, name, Block<T>::elems, Block<T>::bytes, true};
}

static const TypeInfo kTypes[] = {
    decoded<T_F32>("F32"),         decoded<T_F16>("F16"),
    decoded<T_Q4_0>("Q4_0"),       decoded<T_Q4_1>("Q4_1"),
    decoded<T_Q5_0>("Q5_0"),       decoded<T_Q5_1>("Q5_1"),
    decoded<T_Q8_0>("Q8_0"),       {9, "Q8_1", 32, 40, false},
    decoded<T_Q2_K>("Q2_K"),       decoded<T_Q3_K>("Q3_K"),
    decoded<T_Q4_K>("Q4_K"),       decoded<T_Q5_K>("Q5_K"),
    decoded<T_Q6_K>("Q6_K"),       {15, "Q8_K", 256, 292, false},
    {16, "IQ2_XXS", 256, 66, false}, {17, "IQ2_XS", 256, 74, false},
    {18, "IQ3_XXS", 256, 98, false}, {19, "IQ1_S", 256, 50, false},
    {20, "IQ4_NL", 32, 18, false}, {21, "IQ3_S", 256, 110, false},
    {22, "IQ2_S", 256, 82, false}, {23, "IQ4_XS", 256, 136, false},
    {24, "I8", 1, 1, false},       {25, "I16", 1, 2, false},
    {26, "I32", 1, 4, false},      {27, "I64", 1, 8, false},
    {28, "F64", 1, 8, false},      {29, "IQ1_M", 256, 56, false},
    decoded<T_BF16>("BF16"),       {34, "TQ1_0", 256, 54, false},
    {35, "TQ2_0", 256, 66, false}, decoded<T_MXFP4>("MXFP4"),
};

const TypeInfo* type_info(uint32_t id) {
    for (const TypeInfo& t : kTypes)
        if (t.id == id) return &t;
    return nullptr;
}

const char* type_name(uint32_t id) {
    const TypeInfo* t = type_info(id);
    return t ? t->name : "unknown";
}

}  // namespace orcd
