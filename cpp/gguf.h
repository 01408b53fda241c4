// gguf.h - the GGUF reader: the only code in orcd that parses model files.
//
// A GGUFFile maps the whole file read-only, parses header, metadata and
// tensor infos, and checks every count, length, offset and size against the
// file size (with overflow-safe arithmetic) before anything is read. Any
// problem throws orcd::Error naming the file, the field or tensor, and the
// byte offset. Tensor data is never copied: TensorInfo::data points into the
// mapping, which lives as long as the GGUFFile.
//
// Bounds (enforced by the reader, tested in tests/cpp/test_gguf.cpp):
//   string length            <= 1 GiB
//   array nesting depth      <= 8
//   metadata keys            <= 65,536 per file (real models carry ~40)
//   items of nested arrays   <= 65,536 per file, all levels together (real
//                               models carry none): each parsed item costs
//                               ~100 bytes here and more as a Python object,
//                               so a small file of empty arrays must not
//                               expand to gigabytes
//   tensor dimensions        1..4
// Only regular files are opened (a FIFO or device would block or lie about
// its size), and a path with an embedded NUL is refused.
//
// A mapped file that is truncated by someone else makes the next read of a
// lost page raise SIGBUS, which no check can catch. The file stays open and
// check_unchanged() compares its size and modification time with those
// recorded at open, so callers can refuse to read a file that has changed.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ggml_types.h"

namespace orcd {

// GGUF metadata value types (gguf spec, `gguf_metadata_value_type`).
enum class VT : uint32_t {
    U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
    STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};
const char* vt_name(VT t);

// One metadata value. Scalars live in the union; strings and arrays point
// into the mapping (zero-copy), nested arrays hold their items.
struct Value {
    VT type = VT::U8;
    union {
        uint64_t u;   // U8/U16/U32/U64/BOOL
        int64_t i;    // I8/I16/I32/I64
        double f;     // F32/F64
    } num{};
    std::string_view str;            // STRING
    VT elem = VT::U8;                // ARRAY: element type
    uint64_t count = 0;              // ARRAY: number of elements
    const uint8_t* raw = nullptr;    // ARRAY of numbers: packed little-endian elements
    std::vector<std::string_view> strs;  // ARRAY of STRING
    std::vector<Value> items;        // ARRAY of ARRAY

    // Typed accessors that throw orcd::Error naming `key` on a type mismatch.
    int64_t as_int(const std::string& key) const;
    double as_float(const std::string& key) const;
    std::string as_string(const std::string& key) const;
};

// One tensor as described by the file.
struct TensorInfo {
    std::string name;
    uint32_t n_dims = 0;       // 1..4
    int64_t ne[4] = {1, 1, 1, 1};  // ne[0] is the contiguous axis (ggml order)
    uint32_t type = 0;         // ggml type id (see ggml_types.h)
    uint64_t offset = 0;       // from the start of the data section
    uint64_t nbytes = 0;       // exact byte size from ne and the type's block size
    const uint8_t* data = nullptr;  // into the mapping

    int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
    int64_t n_rows() const { return ne[1] * ne[2] * ne[3]; }
    uint64_t row_bytes() const;  // bytes of one ne[0]-row
    std::string shape_str() const;  // "[896, 151936]"
};

class GGUFFile {
public:
    // Maps and validates `path`; throws orcd::Error on any problem.
    explicit GGUFFile(const std::string& path);
    ~GGUFFile();
    GGUFFile(const GGUFFile&) = delete;
    GGUFFile& operator=(const GGUFFile&) = delete;

    // Parses an in-memory image (used by the C++ tests on hand-built bytes).
    // `name` stands in for the path in messages. The bytes are copied.
    static std::unique_ptr<GGUFFile> from_bytes(const void* bytes, size_t n, const std::string& name);

    const std::string& path() const { return path_; }
    uint32_t version() const { return version_; }
    uint64_t alignment() const { return alignment_; }
    uint64_t data_offset() const { return data_offset_; }  // absolute file offset of the data section
    uint64_t file_size() const { return size_; }
    const uint8_t* base() const { return base_; }

    const std::vector<std::pair<std::string, Value>>& metadata() const { return kv_; }
    const std::vector<TensorInfo>& tensors() const { return tensors_; }

    const Value* find(const std::string& key) const;        // nullptr if absent
    const Value& get(const std::string& key) const;         // throws naming the key
    const TensorInfo* find_tensor(const std::string& name) const;  // nullptr if absent
    const TensorInfo& tensor(const std::string& name) const;       // throws naming the tensor

    // Releases the mapping; later access to tensor data is invalid.
    void close();
    bool closed() const { return base_ == nullptr; }

    // Throws orcd::Error naming the file if it is closed, or if its size or
    // modification time differ from those seen at open (it was truncated,
    // extended or rewritten while mapped). One fstat: cheap enough to call
    // before every bulk read of tensor data. No-op for from_bytes images.
    void check_unchanged() const;

private:
    GGUFFile() = default;
    void parse();

    std::string path_;
    const uint8_t* base_ = nullptr;  // mapping (or owned copy for from_bytes)
    uint64_t size_ = 0;
    bool mapped_ = false;            // munmap on close if true, else delete[]
    int fd_ = -1;                    // kept open for check_unchanged()
    int64_t mtime_ns_ = 0;           // st_mtim at open
    uint32_t version_ = 0;
    uint64_t alignment_ = 32;
    uint64_t data_offset_ = 0;
    std::vector<std::pair<std::string, Value>> kv_;
    std::map<std::string, size_t> kv_index_;
    std::vector<TensorInfo> tensors_;
    std::map<std::string, size_t> tensor_index_;
};

}  // namespace orcd
