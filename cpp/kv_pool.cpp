// kv_pool.cpp - KvPool: first-fit ranges of a shared KV pool (see kv_pool.h).
#include "kv_pool.h"

#include <algorithm>
#include <iterator>
#include <string>

#include "error.h"

namespace orcd {

int64_t kv_pool_positions(const std::string& who, int n_slots, int n_ctx, size_t budget_bytes,
                          size_t bytes_per_position) {
    const int64_t per_slot = (int64_t(n_ctx) + kKvUnit - 1) / kKvUnit * kKvUnit;
    const int64_t worst = per_slot * n_slots;
    if (budget_bytes == 0) return worst;
    const int64_t fit = int64_t(budget_bytes / bytes_per_position) / kKvUnit * kKvUnit;
    if (fit < per_slot)
        throw Error(who + ": kv_memory of " + std::to_string(budget_bytes) + " bytes holds " + std::to_string(fit) +
                    " positions; one sequence of n_ctx = " + std::to_string(n_ctx) + " needs " +
                    std::to_string(per_slot * bytes_per_position) + " bytes (" +
                    std::to_string(bytes_per_position) + " a position)");
    return std::min(fit, worst);
}

KvPool::KvPool(int n_slots, int64_t capacity, int unit) : unit_(unit), ranges_(size_t(std::max(n_slots, 0))) {
    if (n_slots < 1) throw Error("KvPool: n_slots must be >= 1 (got " + std::to_string(n_slots) + ")");
    if (unit < 1) throw Error("KvPool: unit must be >= 1 (got " + std::to_string(unit) + ")");
    capacity_ = capacity / unit * unit;
    if (capacity_ < unit) throw Error("KvPool: capacity " + std::to_string(capacity) + " is less than one unit of " +
                                      std::to_string(unit) + " positions");
    free_[0] = capacity_;
}

int64_t KvPool::find_free(int64_t len) const {
    for (const auto& [off, n] : free_)
        if (n >= len) return off;
    return -1;
}

void KvPool::free_range(int64_t off, int64_t len) {
    auto next = free_.lower_bound(off);
    if (next != free_.end() && next->first == off + len) {  // merge with the range after
        len += next->second;
        next = free_.erase(next);
    }
    if (next != free_.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second == off) {  // merge with the range before
            prev->second += len;
            return;
        }
    }
    free_[off] = len;
}

bool KvPool::reserve(int slot, int64_t n_positions, Move* move) {
    if (slot < 0 || slot >= int(ranges_.size()))
        throw Error("KvPool: slot " + std::to_string(slot) + " out of range [0, " + std::to_string(ranges_.size()) + ")");
    if (move) *move = Move{};
    Range& r = ranges_[slot];
    if (n_positions <= r.len) return true;
    const int64_t want = round_up(n_positions);
    if (want > capacity_) return false;
    if (r.off >= 0) {  // grow in place when the range after is free and long enough
        auto it = free_.find(r.off + r.len);
        const int64_t extra = want - r.len;
        if (it != free_.end() && it->second >= extra) {
            const int64_t rest_off = it->first + extra, rest_len = it->second - extra;
            free_.erase(it);
            if (rest_len > 0) free_[rest_off] = rest_len;
            reserved_ += extra;
            r.len = want;
            return true;
        }
    }
    const int64_t off = find_free(want);
    if (off < 0) return false;
    const int64_t len = free_[off];
    free_.erase(off);
    if (len > want) free_[off + want] = len - want;
    if (r.off >= 0) {
        if (move) *move = Move{r.off, off, r.len};
        free_range(r.off, r.len);
        reserved_ -= r.len;
    }
    r.off = off;
    r.len = want;
    reserved_ += want;
    return true;
}

void KvPool::release(int slot) {
    if (slot < 0 || slot >= int(ranges_.size()))
        throw Error("KvPool: slot " + std::to_string(slot) + " out of range [0, " + std::to_string(ranges_.size()) + ")");
    Range& r = ranges_[slot];
    if (r.off < 0) return;
    free_range(r.off, r.len);
    reserved_ -= r.len;
    r = Range{};
}

KvPoolStats KvPool::stats() const {
    KvPoolStats s;
    s.capacity = capacity_;
    s.reserved = reserved_;
    for (const auto& [off, n] : free_) s.largest_free = std::max(s.largest_free, n);
    s.unit = unit_;
    return s;
}

}  // namespace orcd
