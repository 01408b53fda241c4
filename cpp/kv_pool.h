// kv_pool.h - where each cache slot's positions live in an engine's shared KV memory.
//
// Both engines size their K/V caches as one pool of `capacity` positions (per layer) instead
// of n_slots x n_ctx worst cases. A slot holds one contiguous range of the pool: its position
// p lives at pool position offset(slot) + p in every layer. Ranges are whole units of `unit`
// positions, taken first-fit from a free list whose neighbours merge when freed.
//
// Why contiguous ranges and not vLLM's fixed-size pages: every attention kernel (the fused
// single-sequence decoder's staged tiles, the tensor-core prompt and long-cache paths, the
// decode-shaped rows kernel) walks a slot's keys as rows of one stride from a base; a range
// keeps that, with one table lookup per slot instead of one per page of keys. The price is
// external fragmentation: a reservation can fail while enough positions are free in pieces.
// The step loop answers that by waiting (and by giving back idle slots' cached prefixes),
// never by corrupting a cache; an empty pool always has one range of n_ctx positions.
//
// Not thread-safe: the engine's owner serialises calls (as for every engine method).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace orcd {

struct KvPoolStats {
    int64_t capacity = 0;      // positions in the pool
    int64_t reserved = 0;      // positions held by slots
    int64_t largest_free = 0;  // the longest free range (what one reservation can get)
    int unit = 1;              // ranges are multiples of this many positions
};

// Ranges are multiples of this many positions (the attention kernels' key tiles are 32 or 64).
constexpr int kKvUnit = 64;

// Positions of an engine's pool: n_slots x n_ctx (each rounded up to the unit) when
// budget_bytes is 0, else as many as budget_bytes holds at bytes_per_position, capped at
// that worst case; an Error naming `who`, the budget and what one sequence needs when the
// budget holds fewer than n_ctx positions.
int64_t kv_pool_positions(const std::string& who, int n_slots, int n_ctx, size_t budget_bytes,
                          size_t bytes_per_position);

class KvPool {
public:
    // What reserve() changed: a slot's range moved when it could not grow in place;
    // the engine copies positions [0, n) of the slot from `from` to `to` (pool positions).
    struct Move {
        int64_t from = 0, to = 0, n = 0;
    };

    KvPool() = default;
    KvPool(int n_slots, int64_t capacity, int unit);

    // Makes slot hold at least n_positions (> 0) positions: nothing when it already does,
    // else grows its range in place, or moves it (*move says what to copy; the old range is
    // free afterwards). false, and nothing changed, when no free range is long enough.
    bool reserve(int slot, int64_t n_positions, Move* move);
    // Gives the slot's range back (its cached positions are gone).
    void release(int slot);

    int64_t offset(int slot) const { return ranges_[slot].off; }  // -1: no range
    int64_t size(int slot) const { return ranges_[slot].len; }
    KvPoolStats stats() const;
    int64_t round_up(int64_t n) const { return (n + unit_ - 1) / unit_ * unit_; }

private:
    struct Range {
        int64_t off = -1, len = 0;
    };
    void free_range(int64_t off, int64_t len);
    // Start of the first free range of at least len positions, -1 if none (a range being
    // moved is still held while this looks, so its new place never overlaps it).
    int64_t find_free(int64_t len) const;

    int64_t capacity_ = 0, reserved_ = 0;
    int unit_ = 1;
    std::vector<Range> ranges_;
    std::map<int64_t, int64_t> free_;  // offset -> length, no two adjacent
};

}  // namespace orcd
