// test_gguf.cpp - the GGUF reader on hand-built byte buffers, valid and malformed.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "error.h"
#include "gguf.h"

using namespace orcd;

namespace {

// Writes GGUF bytes field by field, so each test can corrupt exactly one.
struct Builder {
    std::vector<uint8_t> b;

    template <typename T>
    Builder& put(T v) {
        uint8_t raw[sizeof(T)];
        std::memcpy(raw, &v, sizeof(T));
        b.insert(b.end(), raw, raw + sizeof(T));
        return *this;
    }
    Builder& str(const std::string& s) {
        put<uint64_t>(s.size());
        b.insert(b.end(), s.begin(), s.end());
        return *this;
    }
    Builder& header(uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
        b.insert(b.end(), {'G', 'G', 'U', 'F'});
        return put(version).put(n_tensors).put(n_kv);
    }
    Builder& kv_u32(const std::string& k, uint32_t v) { return str(k).put<uint32_t>(4).put(v); }
    Builder& kv_str(const std::string& k, const std::string& v) { return str(k).put<uint32_t>(8).str(v); }
    Builder& tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
        str(name).put<uint32_t>((uint32_t)ne.size());
        for (uint64_t n : ne) put(n);
        return put(type).put(offset);
    }
    Builder& pad(size_t align = 32) {
        while (b.size() % align) b.push_back(0);
        return *this;
    }
    Builder& data(size_t n, uint8_t fill = 0) {
        b.insert(b.end(), n, fill);
        return *this;
    }
};

std::unique_ptr<GGUFFile> parse(const std::vector<uint8_t>& b) { return GGUFFile::from_bytes(b.data(), b.size(), "t.gguf"); }

std::string error_of(const std::vector<uint8_t>& b) {
    try {
        parse(b);
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

// A small valid file: every scalar type, a string, arrays (numbers, strings,
// nested), and two tensors (F32 [4, 2] and Q8_0 [32]).
std::vector<uint8_t> valid_file() {
    Builder w;
    w.header(3, 2, 17);
    w.str("u8").put<uint32_t>(0).put<uint8_t>(200);
    w.str("i8").put<uint32_t>(1).put<int8_t>(-5);
    w.str("u16").put<uint32_t>(2).put<uint16_t>(60000);
    w.str("i16").put<uint32_t>(3).put<int16_t>(-30000);
    w.kv_u32("u32", 4000000000u);
    w.str("i32").put<uint32_t>(5).put<int32_t>(-2000000000);
    w.str("f32").put<uint32_t>(6).put<float>(1.5f);
    w.str("bool").put<uint32_t>(7).put<uint8_t>(1);
    w.kv_str("general.architecture", "qwen2");
    w.str("u64").put<uint32_t>(10).put<uint64_t>(1ull << 40);
    w.str("i64").put<uint32_t>(11).put<int64_t>(-(1ll << 40));
    w.str("f64").put<uint32_t>(12).put<double>(0.125);
    w.str("arr_i32").put<uint32_t>(9).put<uint32_t>(5).put<uint64_t>(3).put<int32_t>(1).put<int32_t>(-2).put<int32_t>(3);
    w.str("arr_str").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(2).str("<|im_start|>").str("");
    w.str("arr_nested").put<uint32_t>(9).put<uint32_t>(9).put<uint64_t>(2);
    w.put<uint32_t>(6).put<uint64_t>(1).put<float>(2.0f);   // [2.0]
    w.put<uint32_t>(8).put<uint64_t>(1).str("x");          // ["x"]
    w.kv_u32("general.alignment", 32);
    w.str("empty_arr").put<uint32_t>(9).put<uint32_t>(4).put<uint64_t>(0);
    w.tensor("a", {4, 2}, 0, 0);      // F32: 32 bytes at 0
    w.tensor("b", {32}, 8, 32);       // Q8_0: one block, 34 bytes at 32
    w.pad();
    w.data(32, 1).data(34, 2);
    return w.b;
}

}  // namespace

TEST_CASE("gguf: a valid file parses completely") {
    auto b = valid_file();
    auto f = parse(b);
    CHECK(f->version() == 3);
    CHECK(f->metadata().size() == 17);
    CHECK(f->get("u8").num.u == 200);
    CHECK(f->get("i8").num.i == -5);
    CHECK(f->get("u16").num.u == 60000);
    CHECK(f->get("i16").num.i == -30000);
    CHECK(f->get("u32").as_int("u32") == 4000000000ll);
    CHECK(f->get("i32").as_int("i32") == -2000000000);
    CHECK(f->get("f32").as_float("f32") == 1.5);
    CHECK(f->get("bool").num.u == 1);
    CHECK(f->get("general.architecture").as_string("k") == "qwen2");
    CHECK(f->get("u64").num.u == (1ull << 40));
    CHECK(f->get("i64").num.i == -(1ll << 40));
    CHECK(f->get("f64").as_float("f64") == 0.125);
    const Value& a = f->get("arr_i32");
    REQUIRE(a.type == VT::ARRAY);
    CHECK(a.elem == VT::I32);
    CHECK(a.count == 3);
    int32_t second;
    std::memcpy(&second, a.raw + 4, 4);
    CHECK(second == -2);
    const Value& s = f->get("arr_str");
    REQUIRE(s.strs.size() == 2);
    CHECK(s.strs[0] == "<|im_start|>");
    CHECK(s.strs[1].empty());
    const Value& n = f->get("arr_nested");
    REQUIRE(n.items.size() == 2);
    CHECK(n.items[0].elem == VT::F32);
    CHECK(n.items[1].strs[0] == "x");
    CHECK(f->get("empty_arr").count == 0);
    CHECK(f->find("missing") == nullptr);
    CHECK_THROWS_AS(f->get("missing"), Error);
    CHECK_THROWS_WITH_AS(f->get("u8").as_string("u8"), doctest::Contains("u8"), Error);

    REQUIRE(f->tensors().size() == 2);
    const TensorInfo& t = f->tensor("a");
    CHECK(t.n_dims == 2);
    CHECK(t.ne[0] == 4);  // contiguous axis first, as stored
    CHECK(t.ne[1] == 2);
    CHECK(t.nbytes == 32);
    CHECK(t.row_bytes() == 16);
    CHECK(t.data == f->base() + f->data_offset());
    CHECK(t.data[0] == 1);
    const TensorInfo& q = f->tensor("b");
    CHECK(q.nbytes == 34);
    CHECK(q.data[0] == 2);
    CHECK(f->data_offset() % 32 == 0);
    CHECK_THROWS_WITH_AS(f->tensor("nope"), doctest::Contains("nope"), Error);
}

TEST_CASE("gguf: version 2 is accepted") {
    auto b = valid_file();
    b[4] = 2;
    CHECK(parse(b)->version() == 2);
}

TEST_CASE("gguf: every truncation is a clean error") {
    auto b = valid_file();
    for (size_t n = 0; n < b.size(); ++n) {
        std::vector<uint8_t> cut(b.begin(), b.begin() + n);
        std::string e = error_of(cut);
        INFO("truncated to " << n << " bytes");
        CHECK(!e.empty());
        CHECK(e.find("t.gguf") != std::string::npos);
    }
    // Truncation inside the data section names the tensor.
    std::vector<uint8_t> cut(b.begin(), b.end() - 1);
    CHECK(error_of(cut).find("tensor 'b'") != std::string::npos);
    CHECK(error_of(cut).find("past the end") != std::string::npos);
}

TEST_CASE("gguf: bad magic and version") {
    auto b = valid_file();
    b[0] = 'X';
    CHECK(error_of(b).find("bad magic") != std::string::npos);
    b = valid_file();
    b[4] = 7;
    CHECK(error_of(b).find("unsupported GGUF version 7") != std::string::npos);
    b = valid_file();
    b[4] = 1;
    CHECK(error_of(b).find("version 1") != std::string::npos);
}

TEST_CASE("gguf: absurd counts and lengths fail before allocating") {
    Builder w;
    w.header(3, 0, 1ull << 60);
    CHECK(error_of(w.b).find("metadata count") != std::string::npos);
    Builder w2;
    w2.header(3, 1ull << 60, 0);
    CHECK(error_of(w2.b).find("tensor count") != std::string::npos);
    Builder w3;
    w3.header(3, 0, 1).put<uint64_t>(1ull << 62);  // key length
    w3.data(64);
    CHECK(error_of(w3.b).find("string length") != std::string::npos);
    Builder w4;
    w4.header(3, 0, 1).str("arr").put<uint32_t>(9).put<uint32_t>(4).put<uint64_t>(1ull << 61);
    w4.data(64);
    CHECK(error_of(w4.b).find("does not fit") != std::string::npos);
    Builder w5;  // array of strings whose count lies
    w5.header(3, 0, 1).str("arr").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(1000000);
    w5.data(64);
    CHECK(error_of(w5.b).find("does not fit") != std::string::npos);
}

TEST_CASE("gguf: unknown value and tensor types") {
    Builder w;
    w.header(3, 0, 1).str("k").put<uint32_t>(99).put<uint32_t>(0);
    CHECK(error_of(w.b).find("unknown value type 99") != std::string::npos);
    Builder w2;
    w2.header(3, 0, 1).str("k").put<uint32_t>(9).put<uint32_t>(42).put<uint64_t>(0);
    CHECK(error_of(w2.b).find("unknown array element type 42") != std::string::npos);
    Builder w3;
    w3.header(3, 1, 0).tensor("w", {32}, 77, 0).pad().data(64);
    CHECK(error_of(w3.b).find("unknown tensor type id 77") != std::string::npos);
    Builder w4;
    w4.header(3, 0, 1).str("flag").put<uint32_t>(7).put<uint8_t>(5);
    CHECK(error_of(w4.b).find("bool") != std::string::npos);
}

TEST_CASE("gguf: tensor shapes, offsets and names are checked") {
    auto one = [](std::vector<uint64_t> ne, uint32_t type, uint64_t off, size_t data) {
        Builder w;
        w.header(3, 1, 0).tensor("w", ne, type, off).pad().data(data);
        return error_of(w.b);
    };
    CHECK(one({32}, 0, 0, 128) == "");
    CHECK(one({32}, 0, 64, 128).find("past the end") != std::string::npos);
    CHECK(one({32}, 0, 1ull << 63, 128).find("past the end") != std::string::npos);
    CHECK(one({32}, 0, 3, 128).find("alignment") != std::string::npos);
    CHECK(one({1ull << 40, 1ull << 40}, 0, 0, 128).find("overflows") != std::string::npos);
    CHECK(one({0}, 0, 0, 128).find("zero") != std::string::npos);
    CHECK(one({33}, 8, 0, 128).find("block size") != std::string::npos);
    CHECK(one({}, 0, 0, 128).find("n_dims") != std::string::npos);
    CHECK(one({2, 2, 2, 2, 2}, 0, 0, 128).find("n_dims") != std::string::npos);
    // 2^62 F32 elements: element count fits but bytes overflow.
    CHECK(one({1ull << 31, 1ull << 31}, 0, 0, 128).find("overflows") != std::string::npos);

    Builder dup;
    dup.header(3, 2, 0).tensor("w", {8}, 0, 0).tensor("w", {8}, 0, 32).pad().data(64);
    CHECK(error_of(dup.b).find("duplicate tensor name 'w'") != std::string::npos);
    Builder overlap;
    overlap.header(3, 2, 0).tensor("a", {16}, 0, 0).tensor("b", {16}, 0, 64).pad().data(128);
    CHECK(error_of(overlap.b) == "");
    Builder overlap2;
    overlap2.header(3, 2, 0).tensor("a", {16}, 0, 0).tensor("b", {16}, 0, 0).pad().data(96);
    CHECK(error_of(overlap2.b).find("overlap") != std::string::npos);
    Builder dupkey;
    dupkey.header(3, 0, 2).kv_u32("k", 1).kv_u32("k", 2);
    CHECK(error_of(dupkey.b).find("duplicate metadata key 'k'") != std::string::npos);
}

TEST_CASE("gguf: general.alignment is honoured and validated") {
    Builder w;
    w.header(3, 1, 1).kv_u32("general.alignment", 64).tensor("w", {16}, 0, 0).pad(64).data(64);
    auto f = parse(w.b);
    CHECK(f->alignment() == 64);
    CHECK(f->data_offset() % 64 == 0);
    Builder bad;
    bad.header(3, 0, 1).kv_u32("general.alignment", 48);
    CHECK(error_of(bad.b).find("power of two") != std::string::npos);
    Builder zero;
    zero.header(3, 0, 1).kv_u32("general.alignment", 0);
    CHECK(error_of(zero.b).find("power of two") != std::string::npos);
}

TEST_CASE("gguf: a missing file names the path") {
    try {
        GGUFFile f("/nonexistent/model.gguf");
        FAIL("no error");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find("/nonexistent/model.gguf") != std::string::npos);
    }
}

TEST_CASE("gguf: keys and tensor names must be UTF-8") {
    Builder w;
    w.header(3, 0, 1).str(std::string("k\xea", 2)).put<uint32_t>(4).put<uint32_t>(1);
    CHECK(error_of(w.b).find("metadata key #0 is not valid UTF-8") != std::string::npos);
    Builder t;
    t.header(3, 1, 0).tensor(std::string("\xc0\x80", 2), {8}, 0, 0).pad().data(32);  // overlong NUL
    CHECK(error_of(t.b).find("name of tensor #0 is not valid UTF-8") != std::string::npos);
    Builder ok;
    ok.header(3, 1, 1).kv_u32("ключ✓", 1).tensor("тензор😀", {8}, 0, 0).pad().data(32);
    CHECK(error_of(ok.b) == "");
}

// ---------------------------------------------------------------- resource bounds (see gguf.h)

namespace {

// One key holding `count` empty arrays (12 bytes each in the file).
std::vector<uint8_t> nested_empty_arrays(const std::string& key, uint64_t count) {
    Builder w;
    w.header(3, 0, 1).str(key).put<uint32_t>(9).put<uint32_t>(9).put<uint64_t>(count);
    for (uint64_t k = 0; k < count; ++k) w.put<uint32_t>(4).put<uint64_t>(0);
    return w.b;
}

std::string temp_path(const std::string& name) {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir && *dir ? dir : "/tmp") + "/orcd_test_" + std::to_string(getpid()) + "_" + name;
}

void write_file(const std::string& path, const std::vector<uint8_t>& b) {
    std::ofstream o(path, std::ios::binary | std::ios::trunc);
    o.write((const char*)b.data(), (std::streamsize)b.size());
}

}  // namespace

TEST_CASE("gguf: nested array items are bounded per file, naming the key and offset") {
    // At the limit: parses.
    auto ok = nested_empty_arrays("nest", 1u << 16);
    auto f = parse(ok);
    CHECK(f->get("nest").items.size() == (1u << 16));
    // One over: a clear error before the items are allocated.
    std::string e = error_of(nested_empty_arrays("tokenizer.nest", (1u << 16) + 1));
    CHECK(e.find("metadata key 'tokenizer.nest'") != std::string::npos);
    CHECK(e.find("over the limit of 65536") != std::string::npos);
    CHECK(e.find("at byte offset 54") != std::string::npos);  // the array length field: 24 + 8+14 + 4 + 4
    // The limit covers the whole file: two keys of 40,000 each.
    Builder w;
    w.header(3, 0, 2);
    for (const char* key : {"a", "b"}) {
        w.str(key).put<uint32_t>(9).put<uint32_t>(9).put<uint64_t>(40000);
        for (int k = 0; k < 40000; ++k) w.put<uint32_t>(4).put<uint64_t>(0);
    }
    e = error_of(w.b);
    CHECK(e.find("metadata key 'b'") != std::string::npos);
    CHECK(e.find("80000") != std::string::npos);
    // Deeper levels count too: 300 arrays each holding 300 empty arrays.
    Builder d;
    d.header(3, 0, 1).str("deep").put<uint32_t>(9).put<uint32_t>(9).put<uint64_t>(300);
    for (int i = 0; i < 300; ++i) {
        d.put<uint32_t>(9).put<uint64_t>(300);
        for (int k = 0; k < 300; ++k) d.put<uint32_t>(4).put<uint64_t>(0);
    }
    e = error_of(d.b);
    CHECK(e.find("metadata key 'deep'[") != std::string::npos);
    CHECK(e.find("over the limit") != std::string::npos);
}

TEST_CASE("gguf: the metadata key count is bounded") {
    Builder w;
    const uint64_t n = (1u << 16) + 1;
    w.header(3, 0, n);
    for (uint64_t k = 0; k < n; ++k) w.kv_u32("k" + std::to_string(k), 1);
    std::string e = error_of(w.b);
    CHECK(e.find("metadata count 65537 is over the limit of 65536") != std::string::npos);
}

TEST_CASE("gguf: only regular files are opened; a FIFO fails at once instead of blocking") {
    const std::string fifo = temp_path("fifo.gguf");
    ::unlink(fifo.c_str());
    REQUIRE(mkfifo(fifo.c_str(), 0600) == 0);
    auto t0 = std::chrono::steady_clock::now();
    try {
        GGUFFile f(fifo);
        FAIL("a FIFO opened");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find(fifo) != std::string::npos);
        CHECK(std::string(e.what()).find("not a regular file (a FIFO)") != std::string::npos);
    }
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
    ::unlink(fifo.c_str());
    CHECK_THROWS_WITH_AS(GGUFFile{"/tmp"}, doctest::Contains("(a directory)"), Error);
    CHECK_THROWS_WITH_AS(GGUFFile{"/dev/null"}, doctest::Contains("(a character device)"), Error);
}

TEST_CASE("gguf: a path with an embedded NUL is refused, not truncated") {
    const std::string real = temp_path("nul.gguf");
    write_file(real, valid_file());
    GGUFFile ok(real);  // the prefix is a valid file
    CHECK(ok.tensors().size() == 2);
    const std::string with_nul = real + std::string("\0.ignored", 9);
    CHECK_THROWS_WITH_AS(GGUFFile{with_nul}, doctest::Contains("NUL"), Error);
    ::unlink(real.c_str());
}

TEST_CASE("gguf: check_unchanged notices a file that grew, shrank or was rewritten") {
    const std::string path = temp_path("changed.gguf");
    auto b = valid_file();
    write_file(path, b);
    {
        GGUFFile f(path);
        CHECK_NOTHROW(f.check_unchanged());
        std::ofstream(path, std::ios::binary | std::ios::app).put('x');
        CHECK_THROWS_WITH_AS(f.check_unchanged(), doctest::Contains("changed while open"), Error);
        f.close();
        CHECK_THROWS_WITH_AS(f.check_unchanged(), doctest::Contains("is closed"), Error);
    }
    write_file(path, b);
    {
        GGUFFile f(path);
        CHECK(::truncate(path.c_str(), (off_t)b.size() / 2) == 0);
        const std::string was = "size " + std::to_string(b.size()) + " -> " + std::to_string(b.size() / 2);
        CHECK_THROWS_WITH_AS(f.check_unchanged(), doctest::Contains(was.c_str()), Error);
    }
    write_file(path, b);
    {
        GGUFFile f(path);
        // same size, new contents: only the modification time tells
        struct timespec times[2] = {{0, UTIME_OMIT}, {12345, 0}};
        REQUIRE(utimensat(AT_FDCWD, path.c_str(), times, 0) == 0);
        CHECK_THROWS_WITH_AS(f.check_unchanged(), doctest::Contains("modification time changed"), Error);
    }
    auto mem = parse(b);
    CHECK_NOTHROW(mem->check_unchanged());  // an in-memory image
    ::unlink(path.c_str());
}
