// gguf.cpp - the GGUF reader (see gguf.h).
//
// Layout of a GGUF file (little-endian):
//   magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv          (v1 used u32 counts: unsupported)
//   n_kv x { string key | u32 value_type | value }
//   n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 type | u64 offset }
//   padding to `general.alignment` (default 32) | tensor data
// A string is u64 length + bytes (no terminator). An array value is
// u32 element_type + u64 count + elements.
//
// Every read goes through Cursor, which checks the remaining length first, so
// a truncated or lying file fails with the offset and the field being read.

#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

#include "error.h"

namespace orcd {

// ============================================================ small helpers

const char* vt_name(VT t) {
    switch (t) {
        case VT::U8: return "u8";     case VT::I8: return "i8";
        case VT::U16: return "u16";   case VT::I16: return "i16";
        case VT::U32: return "u32";   case VT::I32: return "i32";
        case VT::F32: return "f32";   case VT::BOOL: return "bool";
        case VT::STRING: return "string"; case VT::ARRAY: return "array";
        case VT::U64: return "u64";   case VT::I64: return "i64";
        case VT::F64: return "f64";
    }
    return "unknown";
}

// Byte size of a fixed-size value type; 0 for STRING/ARRAY/unknown.
static size_t vt_size(VT t) {
    switch (t) {
        case VT::U8: case VT::I8: case VT::BOOL: return 1;
        case VT::U16: case VT::I16: return 2;
        case VT::U32: case VT::I32: case VT::F32: return 4;
        case VT::U64: case VT::I64: case VT::F64: return 8;
        default: return 0;
    }
}

static bool vt_known(uint32_t t) { return t <= 12; }

// Keys and tensor names must be valid UTF-8 (the spec says so, and they
// become Python str); values are decoded leniently by the bindings.
static bool valid_utf8(std::string_view s) {
    size_t i = 0, n = s.size();
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        if (len == 0 || i + len > n) return false;
        uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
        for (int k = 1; k < len; ++k) {
            unsigned char d = (unsigned char)s[i + k];
            if ((d >> 6) != 0x2) return false;
            cp = (cp << 6) | (d & 0x3F);
        }
        static const uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += len;
    }
    return true;
}

// a * b with overflow detection.
static bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
    return __builtin_mul_overflow(a, b, out);
}

// Limits that keep a hostile file from making us allocate or loop absurdly
// (stated in gguf.h). The real vocabularies have ~150k entries in flat string
// arrays; nested arrays do not occur in practice.
static constexpr uint64_t kMaxStringLen = 1ull << 30;   // 1 GiB
static constexpr int kMaxArrayDepth = 8;
static constexpr uint64_t kMaxKeys = 1u << 16;
static constexpr uint64_t kMaxNestedItems = 1u << 16;
static constexpr uint32_t kMaxDims = 4;

// ============================================================ Value accessors

int64_t Value::as_int(const std::string& key) const {
    switch (type) {
        case VT::U8: case VT::U16: case VT::U32: case VT::U64: case VT::BOOL:
            if (num.u > (uint64_t)INT64_MAX) break;
            return (int64_t)num.u;
        case VT::I8: case VT::I16: case VT::I32: case VT::I64:
            return num.i;
        default: break;
    }
    throw Error("metadata key '" + key + "' is " + vt_name(type) + ", expected an integer");
}

double Value::as_float(const std::string& key) const {
    switch (type) {
        case VT::F32: case VT::F64: return num.f;
        case VT::U8: case VT::U16: case VT::U32: case VT::U64: return (double)num.u;
        case VT::I8: case VT::I16: case VT::I32: case VT::I64: return (double)num.i;
        default: break;
    }
    throw Error("metadata key '" + key + "' is " + vt_name(type) + ", expected a number");
}

std::string Value::as_string(const std::string& key) const {
    if (type != VT::STRING)
        throw Error("metadata key '" + key + "' is " + vt_name(type) + ", expected a string");
    return std::string(str);
}

uint64_t TensorInfo::row_bytes() const {
    const TypeInfo* ti = type_info(type);
    return ti ? (uint64_t)(ne[0] / ti->block_size) * ti->block_bytes : 0;
}

std::string TensorInfo::shape_str() const {
    std::string s = "[";
    for (uint32_t d = 0; d < n_dims; ++d) {
        if (d) s += ", ";
        s += std::to_string(ne[d]);
    }
    return s + "]";
}

// ============================================================ the cursor

namespace {

// Field descriptions for error messages are built only when a read fails:
// `what` is either a string or a callable returning one (the vocabulary has
// ~150k strings; formatting a name for each would dominate the parse).
inline const std::string& describe(const std::string& s) { return s; }
inline std::string describe(const char* s) { return s; }
template <typename F>
std::string describe(const F& f) { return f(); }

struct Cursor {
    const uint8_t* base;  // start of file
    uint64_t size;        // file size
    uint64_t pos = 0;     // next byte to read
    const std::string& file;

    [[noreturn]] void fail(const std::string& what, uint64_t at) const {
        std::ostringstream m;
        m << file << ": " << what << " (at byte offset " << at << ", file size " << size << ")";
        throw Error(m.str());
    }

    // Ensures n more bytes exist; `what` names the field for the message.
    template <typename W>
    void need(uint64_t n, const W& what) const {
        if (n > size - pos) {
            std::ostringstream m;
            m << "truncated file: " << describe(what) << " needs " << n << " bytes but only "
              << (size - pos) << " remain";
            fail(m.str(), pos);
        }
    }

    template <typename T, typename W>
    T read(const W& what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, base + pos, sizeof(T));
        pos += sizeof(T);
        return v;
    }

    template <typename W>
    std::string_view read_string(const W& what) {
        uint64_t at = pos;
        uint64_t len = read<uint64_t>([&] { return describe(what) + " (string length)"; });
        if (len > kMaxStringLen) {
            std::ostringstream m;
            m << describe(what) << ": string length " << len << " is absurd";
            fail(m.str(), at);
        }
        need(len, what);
        std::string_view s((const char*)base + pos, len);
        pos += len;
        return s;
    }
};

// Items of nested arrays parsed so far in one file (see kMaxNestedItems).
struct Budget {
    uint64_t nested_items = 0;
};

}  // namespace

// Reads a value of type `t` at the cursor into `v`. `what` names the key.
static void read_value(Cursor& c, VT t, Value& v, const std::string& what, int depth, Budget& budget) {
    v.type = t;
    switch (t) {
        case VT::U8: v.num.u = c.read<uint8_t>(what); break;
        case VT::I8: v.num.i = c.read<int8_t>(what); break;
        case VT::U16: v.num.u = c.read<uint16_t>(what); break;
        case VT::I16: v.num.i = c.read<int16_t>(what); break;
        case VT::U32: v.num.u = c.read<uint32_t>(what); break;
        case VT::I32: v.num.i = c.read<int32_t>(what); break;
        case VT::U64: v.num.u = c.read<uint64_t>(what); break;
        case VT::I64: v.num.i = c.read<int64_t>(what); break;
        case VT::F32: v.num.f = c.read<float>(what); break;
        case VT::F64: v.num.f = c.read<double>(what); break;
        case VT::BOOL: {
            uint64_t at = c.pos;
            uint8_t b = c.read<uint8_t>(what);
            if (b > 1) c.fail(what + ": bool value " + std::to_string(b) + " is not 0 or 1", at);
            v.num.u = b;
            break;
        }
        case VT::STRING: v.str = c.read_string(what); break;
        case VT::ARRAY: {
            uint64_t at = c.pos;
            if (depth >= kMaxArrayDepth) c.fail(what + ": arrays nested too deeply", at);
            uint32_t et = c.read<uint32_t>(what + " (array element type)");
            if (!vt_known(et))
                c.fail(what + ": unknown array element type " + std::to_string(et), at);
            v.elem = (VT)et;
            at = c.pos;
            v.count = c.read<uint64_t>(what + " (array length)");
            // Every element takes at least one byte (strings: 8), so a count
            // larger than the remaining bytes is a lie: reject before reserving.
            size_t es = vt_size(v.elem);
            uint64_t min_elem = es ? es : (v.elem == VT::STRING ? 8 : 12);
            uint64_t min_total;
            if (mul_overflows(v.count, min_elem, &min_total) || min_total > c.size - c.pos) {
                std::ostringstream m;
                m << what << ": array of " << v.count << " " << vt_name(v.elem)
                  << " elements does not fit in the " << (c.size - c.pos) << " bytes left";
                c.fail(m.str(), at);
            }
            if (es) {
                v.raw = c.base + c.pos;
                c.pos += v.count * es;
            } else if (v.elem == VT::STRING) {
                v.strs.reserve(v.count);
                for (uint64_t k = 0; k < v.count; ++k)
                    v.strs.push_back(c.read_string([&] { return what + "[" + std::to_string(k) + "]"; }));
            } else {
                if (v.count > kMaxNestedItems - budget.nested_items) {
                    std::ostringstream m;
                    m << what << ": array of " << v.count << " arrays would bring the file's nested array items to "
                      << budget.nested_items + v.count << ", over the limit of " << kMaxNestedItems;
                    c.fail(m.str(), at);
                }
                budget.nested_items += v.count;
                v.items.resize(v.count);
                for (uint64_t k = 0; k < v.count; ++k)
                    read_value(c, VT::ARRAY, v.items[k], what + "[" + std::to_string(k) + "]", depth + 1, budget);
            }
            break;
        }
        default:
            c.fail(what + ": unknown value type " + std::to_string((uint32_t)t), c.pos);
    }
}

// ============================================================ GGUFFile

// Modification time of a stat result in nanoseconds.
static int64_t mtime_ns(const struct stat& st) {
    return (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
}

GGUFFile::GGUFFile(const std::string& path) : path_(path) {
    if (path.find('\0') != std::string::npos)
        throw Error("model path contains a NUL character: '" + path.substr(0, path.find('\0')) + "\\0...'");
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    // writer; the type check below then refuses it.
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        ::close(fd);
        throw Error(path + ": cannot stat: " + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        const char* kind = S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO"
                         : S_ISCHR(st.st_mode) ? "a character device" : S_ISBLK(st.st_mode) ? "a block device"
                         : S_ISSOCK(st.st_mode) ? "a socket" : "not a regular file";
        throw Error(path + ": not a regular file (" + kind + "); a GGUF model must be a regular file");
    }
    size_ = (uint64_t)st.st_size;
    mtime_ns_ = mtime_ns(st);
    if (size_ == 0) {
        ::close(fd);
        throw Error(path + ": empty file, not a GGUF model");
    }
    void* p = mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    int e = errno;
    if (p == MAP_FAILED) {
        ::close(fd);
        throw Error(path + ": mmap failed: " + std::strerror(e));
    }
    fd_ = fd;
    base_ = (const uint8_t*)p;
    mapped_ = true;
    try {
        parse();
    } catch (...) {
        close();
        throw;
    }
}

std::unique_ptr<GGUFFile> GGUFFile::from_bytes(const void* bytes, size_t n, const std::string& name) {
    std::unique_ptr<GGUFFile> f(new GGUFFile());
    f->path_ = name;
    uint8_t* copy = new uint8_t[n ? n : 1];
    if (n) std::memcpy(copy, bytes, n);
    f->base_ = copy;
    f->size_ = n;
    f->mapped_ = false;
    f->parse();  // on throw, unique_ptr's destructor closes
    return f;
}

GGUFFile::~GGUFFile() { close(); }

void GGUFFile::close() {
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
    if (!base_) return;
    if (mapped_) munmap((void*)base_, size_);
    else delete[] base_;
    base_ = nullptr;
    for (TensorInfo& t : tensors_) t.data = nullptr;
}

void GGUFFile::check_unchanged() const {
    if (!base_) throw Error("GGUF file '" + path_ + "' is closed");
    if (fd_ < 0) return;  // an in-memory image cannot change
    struct stat st;
    if (fstat(fd_, &st) != 0) throw Error(path_ + ": cannot stat: " + std::strerror(errno));
    if ((uint64_t)st.st_size != size_ || mtime_ns(st) != mtime_ns_) {
        std::ostringstream m;
        m << path_ << ": the file changed while open (size " << size_ << " -> " << st.st_size << " bytes"
          << (mtime_ns(st) != mtime_ns_ ? ", modification time changed" : "")
          << "); a model file must not be modified or truncated while orcd has it mapped: reopen it";
        throw Error(m.str());
    }
}

void GGUFFile::parse() {
    Cursor c{base_, size_, 0, path_};

    // ---- header
    uint32_t magic = c.read<uint32_t>("magic");
    if (std::memcmp(&magic, "GGUF", 4) != 0) {
        char shown[5] = {0};
        std::memcpy(shown, &magic, 4);
        for (int k = 0; k < 4; ++k)
            if (shown[k] < 32 || shown[k] > 126) shown[k] = '?';
        c.fail(std::string("not a GGUF file: bad magic '") + shown + "' (expected 'GGUF')", 0);
    }
    version_ = c.read<uint32_t>("version");
    if (version_ != 2 && version_ != 3)
        c.fail("unsupported GGUF version " + std::to_string(version_) + " (supported: 2, 3)", 4);
    uint64_t n_tensors = c.read<uint64_t>("tensor count");
    uint64_t n_kv = c.read<uint64_t>("metadata count");
    // Each kv takes >= 8+4+1 bytes, each tensor info >= 8+4+8+4+8 bytes.
    if (n_kv > (size_ - c.pos) / 13)
        c.fail("metadata count " + std::to_string(n_kv) + " cannot fit in the file", 16);
    if (n_kv > kMaxKeys)
        c.fail("metadata count " + std::to_string(n_kv) + " is over the limit of " + std::to_string(kMaxKeys) +
               " keys", 16);
    if (n_tensors > (size_ - c.pos) / 32)
        c.fail("tensor count " + std::to_string(n_tensors) + " cannot fit in the file", 8);

    // ---- metadata
    Budget budget;
    kv_.reserve(n_kv);
    for (uint64_t k = 0; k < n_kv; ++k) {
        uint64_t at = c.pos;
        std::string key(c.read_string("metadata key #" + std::to_string(k)));
        if (!valid_utf8(key)) c.fail("metadata key #" + std::to_string(k) + " is not valid UTF-8", at);
        uint32_t t = c.read<uint32_t>("type of metadata key '" + key + "'");
        if (!vt_known(t))
            c.fail("metadata key '" + key + "' has unknown value type " + std::to_string(t), at);
        Value v;
        read_value(c, (VT)t, v, "metadata key '" + key + "'", 0, budget);
        if (kv_index_.count(key)) c.fail("duplicate metadata key '" + key + "'", at);
        kv_index_[key] = kv_.size();
        kv_.emplace_back(std::move(key), std::move(v));
    }

    alignment_ = 32;
    if (const Value* a = find("general.alignment")) {
        if (a->type != VT::U32 && a->type != VT::U64 && a->type != VT::I32)
            throw Error(path_ + ": metadata key 'general.alignment' has type " + vt_name(a->type) + ", expected u32");
        int64_t al = a->as_int("general.alignment");
        if (al <= 0 || (al & (al - 1)) != 0 || al > (1 << 20))
            throw Error(path_ + ": general.alignment = " + std::to_string(al) + " is not a power of two (<= 1 MiB)");
        alignment_ = (uint64_t)al;
    }

    // ---- tensor infos
    tensors_.resize(n_tensors);
    for (uint64_t k = 0; k < n_tensors; ++k) {
        TensorInfo& t = tensors_[k];
        uint64_t at = c.pos;
        t.name = std::string(c.read_string("name of tensor #" + std::to_string(k)));
        if (!valid_utf8(t.name)) c.fail("name of tensor #" + std::to_string(k) + " is not valid UTF-8", at);
        std::string what = "tensor '" + t.name + "'";
        t.n_dims = c.read<uint32_t>(what + " n_dims");
        if (t.n_dims == 0 || t.n_dims > kMaxDims)
            c.fail(what + ": n_dims = " + std::to_string(t.n_dims) + " (must be 1..4)", at);
        uint64_t n_el = 1;
        for (uint32_t d = 0; d < t.n_dims; ++d) {
            uint64_t dim_at = c.pos;
            uint64_t ne = c.read<uint64_t>(what + " ne[" + std::to_string(d) + "]");
            if (ne == 0 || ne > (uint64_t)INT64_MAX || mul_overflows(n_el, ne, &n_el) || n_el > (uint64_t)INT64_MAX)
                c.fail(what + ": dimension ne[" + std::to_string(d) + "] = " + std::to_string(ne) +
                       " is zero or overflows", dim_at);
            t.ne[d] = (int64_t)ne;
        }
        uint64_t type_at = c.pos;
        t.type = c.read<uint32_t>(what + " type");
        const TypeInfo* ti = type_info(t.type);
        if (!ti) c.fail(what + ": unknown tensor type id " + std::to_string(t.type), type_at);
        if (t.ne[0] % ti->block_size != 0)
            c.fail(what + ": ne[0] = " + std::to_string(t.ne[0]) + " is not a multiple of the " +
                   ti->name + " block size " + std::to_string(ti->block_size), type_at);
        uint64_t n_blocks = n_el / (uint64_t)ti->block_size;
        if (mul_overflows(n_blocks, (uint64_t)ti->block_bytes, &t.nbytes))
            c.fail(what + ": byte size overflows", type_at);
        uint64_t off_at = c.pos;
        t.offset = c.read<uint64_t>(what + " data offset");
        if (t.offset % alignment_ != 0)
            c.fail(what + ": data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                   std::to_string(alignment_), off_at);
        if (tensor_index_.count(t.name)) c.fail("duplicate tensor name '" + t.name + "'", at);
        tensor_index_[t.name] = k;
    }

    // ---- data section
    uint64_t pad = (alignment_ - c.pos % alignment_) % alignment_;
    data_offset_ = c.pos + pad;
    if (n_tensors > 0 && data_offset_ > size_)
        c.fail("truncated file: the tensor data section would start past the end", c.pos);
    uint64_t data_size = data_offset_ <= size_ ? size_ - data_offset_ : 0;
    for (TensorInfo& t : tensors_) {
        uint64_t end;
        if (__builtin_add_overflow(t.offset, t.nbytes, &end) || end > data_size) {
            std::ostringstream m;
            m << path_ << ": tensor '" << t.name << "' (" << type_name(t.type) << " " << t.shape_str()
              << ", " << t.nbytes << " bytes at data offset " << t.offset
              << ") runs past the end of the file: the data section holds " << data_size
              << " bytes (file truncated?)";
            throw Error(m.str());
        }
        t.data = base_ + data_offset_ + t.offset;
    }
    // Overlapping tensors would mean a corrupt table; check sorted neighbours.
    std::vector<const TensorInfo*> order;
    order.reserve(tensors_.size());
    for (const TensorInfo& t : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
    for (size_t k = 1; k < order.size(); ++k)
        if (order[k - 1]->offset + order[k - 1]->nbytes > order[k]->offset)
            throw Error(path_ + ": tensors '" + order[k - 1]->name + "' and '" + order[k]->name +
                        "' overlap in the data section");
}

const Value* GGUFFile::find(const std::string& key) const {
    auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const Value& GGUFFile::get(const std::string& key) const {
    const Value* v = find(key);
    if (!v) throw Error(path_ + ": missing metadata key '" + key + "'");
    return *v;
}

const TensorInfo* GGUFFile::find_tensor(const std::string& name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& GGUFFile::tensor(const std::string& name) const {
    const TensorInfo* t = find_tensor(name);
    if (!t) throw Error(path_ + ": missing tensor '" + name + "'");
    return *t;
}

}  // namespace orcd
