"""NumPy model of the warp-level index arithmetic in cuda/sample_kernels.cu (the top_k <= 64
split path): the 64-element bitonic sort/merge over (lane, register) pairs, and warp_scan64
against block_scan's Hillis-Steele additions. Run: python scripts/model_warp_topk.py
(a check of the layout only; the GPU tests compare the kernels themselves bit for bit)."""
from __future__ import annotations

import numpy as np


def bitonic_stage(x, size, stride):
    """x: [32, 2] (lane, register), element j = 2 lane + i; mirrors bitonic_stage()."""
    lane = np.arange(32)
    out = x.copy()
    if stride == 1:
        desc = ((2 * lane) & size) == 0
        a, b = x[:, 0], x[:, 1]
        sw = np.where(desc, a < b, a > b)
        out[sw, 0], out[sw, 1] = b[sw], a[sw]
        return out
    desc = ((2 * lane) & size) == 0
    lower = ((2 * lane) & stride) == 0
    keep_max = lower == desc
    for i in range(2):
        o = x[lane ^ (stride >> 1), i]
        out[:, i] = np.where(keep_max, np.maximum(x[:, i], o), np.minimum(x[:, i], o))
    return out


def sort64(x):
    size = 2
    while size <= 64:
        stride = size >> 1
        while stride > 0:
            x = bitonic_stage(x, size, stride)
            stride >>= 1
        size <<= 1
    return x


def merge64(x, y):
    lane = np.arange(32)
    r0, r1 = y[31 - lane, 1], y[31 - lane, 0]
    x = np.stack([np.maximum(x[:, 0], r0), np.maximum(x[:, 1], r1)], 1)
    stride = 32
    while stride > 0:
        x = bitonic_stage(x, 64, stride)
        stride >>= 1
    return x


def flat(x):  # element j = 2 lane + i
    return x.reshape(64)


def block_scan(v, n=1024):
    buf = np.zeros(n)
    buf[: len(v)] = v
    off = 1
    while off < n:
        add = np.concatenate([np.zeros(off), buf[:-off]])
        buf = buf + add
        off <<= 1
    return buf


def warp_scan64(v):
    """v: 64 values at positions t = 32 i + lane; mirrors warp_scan64()."""
    a = np.stack([v[:32], v[32:]]).astype(np.float64)  # a[i][lane]
    lane = np.arange(32)
    o = 1
    while o < 32:
        y0 = a[0][(lane - o) & 31]
        y1 = np.concatenate([a[1][:o], a[1][:-o]])  # shfl_up: lanes < o get their own value (unused)
        n0 = a[0] + np.where(lane >= o, y0, 0.0)
        n1 = a[1] + np.where(lane >= o, y1, y0)
        a = np.stack([n0, n1])
        o <<= 1
    a[1] = a[1] + a[0]
    return np.concatenate([a[0], a[1]])


def main():
    rng = np.random.default_rng(0)
    for trial in range(300):
        vals = rng.permutation(10 ** 6)[:64].astype(np.uint64) + 1
        x = vals.reshape(32, 2)
        s = flat(sort64(x))
        assert np.array_equal(s, np.sort(vals)[::-1]), trial
        other = (rng.permutation(10 ** 6)[:64].astype(np.uint64) + 10 ** 6).reshape(32, 2)
        m = flat(merge64(sort64(x), sort64(other)))
        want = np.sort(np.concatenate([vals, flat(other)]))[::-1][:64]
        assert np.array_equal(m, want), trial
        # zero padding and a partly empty list
        pad = vals.copy()
        pad[rng.random(64) < 0.5] = 0
        m2 = flat(merge64(sort64(pad.reshape(32, 2)), sort64(np.zeros((32, 2), np.uint64))))
        assert np.array_equal(m2, np.sort(pad)[::-1]), trial
        # the scan: the same doubles as block_scan for every prefix below 64 and the total
        C = int(rng.integers(1, 65))
        v = np.zeros(64)
        v[:C] = rng.random(C) * 10.0 ** rng.integers(-12, 1, size=C)
        bs = block_scan(v)
        ws = warp_scan64(v)
        assert np.array_equal(ws, bs[:64]), trial
        assert ws[63] == bs[1023], trial
    print("ok")


if __name__ == "__main__":
    main()
