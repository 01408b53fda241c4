// replay_main.cpp - runs LLVMFuzzerTestOneInput over files, for builds
// without libFuzzer: orcd_fuzz_gguf_replay DIR_OR_FILE... replays every
// regular file (sorted by name) and fails if any input escapes as an
// exception other than orcd::Error (a crash or sanitizer report ends the
// process on its own). Empty or missing directories are fine.
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

static void collect(const std::string& path, std::vector<std::string>& files) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) return;
    if (S_ISREG(st.st_mode)) {
        files.push_back(path);
        return;
    }
    if (!S_ISDIR(st.st_mode)) return;
    DIR* d = opendir(path.c_str());
    if (!d) return;
    std::vector<std::string> names;
    while (dirent* e = readdir(d))
        if (e->d_name[0] != '.') names.push_back(e->d_name);
    closedir(d);
    std::sort(names.begin(), names.end());
    for (const std::string& n : names) collect(path + "/" + n, files);
}

int main(int argc, char** argv) {
    std::vector<std::string> files;
    for (int i = 1; i < argc; ++i) collect(argv[i], files);
    int failed = 0;
    auto t0 = std::chrono::steady_clock::now();
    for (const std::string& path : files) {
        std::ifstream in(path, std::ios::binary);
        std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        try {
            LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
        } catch (const std::exception& e) {
            std::fprintf(stderr, "FAIL %s: uncaught %s\n", path.c_str(), e.what());
            ++failed;
        }
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("replayed %zu inputs in %.2f s: %zu passed, %d failed\n", files.size(), s, files.size() - failed, failed);
    return failed ? 1 : 0;
}
