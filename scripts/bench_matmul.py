#!/usr/bin/env python3
"""Accuracy and speed of orcd's CPU matmul.

accuracy (default): runs a small NumPy Qwen2 forward pass over a short prompt
with the real model's weights (dequantized with gguf.quants), captures the
input of every matmul (q/k/v/o/gate/up/down per layer, and output.weight),
and compares orcd._orcd.matmul on the stored (quantized) weights with the
exact float64 product of the same inputs and the dequantized weights:

    rel = ||y_orcd - y_exact|| / ||y_exact||,   cos = <y_orcd, y_exact> / norms

reported per tensor kind and weight type (worst and mean over layers).

speed: builds the CMake target orcd_bench_matmul (scripts/bench_matmul.cpp, option
ORCD_BUILD_BENCH; build directory build/bench or $ORCD_BENCH_BUILD_DIR) and runs it:
it times all matmuls of one forward pass of the real model at m = 1 and m = 512
for 1 and 2 threads and prints GFLOP/s and the implied tokens/s of the matmuls alone.
micro: the same binary's cache-resident per-type kernel speed (1 thread).

    python scripts/bench_matmul.py [accuracy|speed|micro] [--model PATH] [--tokens N]

The native module is `orcd._orcd`, or `_orcd` from the build directory named
by ORCD_NATIVE_DIR (e.g. build/h-matmul-py) when that is set.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_native():
    d = os.environ.get("ORCD_NATIVE_DIR")
    if d:
        sys.path.insert(0, d)
        import _orcd as m  # type: ignore
        return m
    import orcd._orcd as m  # noqa: F401
    return m


# ----------------------------------------------------------------- accuracy

class Capture:
    """Minimal Qwen2 forward (float32, NumPy) that records matmul inputs."""

    def __init__(self, path: str):
        from gguf import GGUFReader
        from gguf.quants import dequantize
        self.r = GGUFReader(path)
        self.deq = dequantize
        self.t = {t.name: t for t in self.r.tensors}
        f = self.r.fields

        def val(key):
            fld = f[key]
            return fld.parts[fld.data[0]][0]
        arch = "qwen2"
        self.n_layer = int(val(f"{arch}.block_count"))
        self.n_head = int(val(f"{arch}.attention.head_count"))
        self.n_head_kv = int(val(f"{arch}.attention.head_count_kv"))
        self.eps = float(val(f"{arch}.attention.layer_norm_rms_epsilon"))
        self.base = float(val(f"{arch}.rope.freq_base"))
        tok = f["tokenizer.ggml.tokens"]
        self.vocab = {bytes(tok.parts[i]).decode("utf-8", "replace"): k for k, i in enumerate(tok.data)}

    def w(self, name):
        t = self.t[name]
        return np.asarray(self.deq(t.data, t.tensor_type), dtype=np.float32).reshape(
            [int(x) for x in reversed(t.shape)] if len(t.shape) > 1 else [int(t.shape[0])])

    def raw(self, name):
        t = self.t[name]
        return int(t.tensor_type), np.ascontiguousarray(t.data).view(np.uint8).reshape(-1), \
            int(t.shape[0]), int(t.shape[1])

    def tokens(self, text: str):
        ids = []
        for i, word in enumerate(text.split(" ")):
            key = word if i == 0 else "\u0120" + word
            if key in self.vocab:
                ids.append(self.vocab[key])
            elif word in self.vocab:
                ids.append(self.vocab[word])
        return ids

    def run(self, ids, record):
        def rms(x, w):
            return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

        emb = self.w("token_embd.weight")
        x = emb[ids].astype(np.float32)
        n = len(ids)
        hd = x.shape[1] // self.n_head
        pos = np.arange(n, dtype=np.float64)
        inv = self.base ** (-2.0 * np.arange(hd // 2) / hd)
        ang = pos[:, None] * inv[None, :]
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

        def rope(v):  # v [n, heads, hd], NEOX pairs
            a, b = v[..., : hd // 2], v[..., hd // 2:]
            return np.concatenate([a * cos[:, None] - b * sin[:, None], a * sin[:, None] + b * cos[:, None]], -1)

        def mm(name, inp):
            W = self.w(name)
            record(name, inp)
            return inp @ W.T

        for il in range(self.n_layer):
            p = f"blk.{il}."
            h = rms(x, self.w(p + "attn_norm.weight"))
            q = mm(p + "attn_q.weight", h) + self.w(p + "attn_q.bias")
            k = mm(p + "attn_k.weight", h) + self.w(p + "attn_k.bias")
            v = mm(p + "attn_v.weight", h) + self.w(p + "attn_v.bias")
            q = rope(q.reshape(n, self.n_head, hd))
            k = rope(k.reshape(n, self.n_head_kv, hd))
            v = v.reshape(n, self.n_head_kv, hd)
            g = self.n_head // self.n_head_kv
            att = np.zeros((n, self.n_head, hd), np.float32)
            mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)
            for hh in range(self.n_head):
                s = q[:, hh] @ k[:, hh // g].T / np.sqrt(hd) + mask
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                att[:, hh] = s @ v[:, hh // g]
            x = x + mm(p + "attn_output.weight", att.reshape(n, -1))
            h = rms(x, self.w(p + "ffn_norm.weight"))
            gt = mm(p + "ffn_gate.weight", h)
            up = mm(p + "ffn_up.weight", h)
            x = x + mm(p + "ffn_down.weight", (gt / (1 + np.exp(-gt))) * up)
        h = rms(x, self.w("output_norm.weight"))
        out = "output.weight" if "output.weight" in self.t else "token_embd.weight"
        record(out, h[-1:])


def accuracy(args):
    nat = load_native()
    cap = Capture(args.model)
    text = ("The quick brown fox jumps over the lazy dog and then writes a small Python function "
            "that returns the sum of two numbers")
    ids = cap.tokens(text)[: args.tokens]
    print(f"{len(ids)} prompt tokens, {cap.n_layer} layers")
    rows = {}

    def record(name, inp):
        type_id, wraw, n_in, n_out = cap.raw(name)
        W = cap.w(name).astype(np.float64)
        x = np.ascontiguousarray(inp, dtype=np.float32)
        exact = x.astype(np.float64) @ W.T
        y = nat.matmul(type_id, wraw, n_in, n_out, x, args.threads).astype(np.float64)
        rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
        cos = float(np.sum(y * exact) / (np.linalg.norm(y) * np.linalg.norm(exact)))
        # per-row worst
        rrel = np.max(np.linalg.norm(y - exact, axis=1) / np.linalg.norm(exact, axis=1))
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        tname = nat.type_traits(type_id)[0] if hasattr(nat, "type_traits") else str(type_id)
        rows.setdefault((kind, tname), []).append((rel, rrel, cos, name))

    cap.run(ids, record)
    print(f"{'tensor':12s} {'type':5s} {'n':>3s} {'mean rel':>9s} {'max rel':>9s} {'max row rel':>11s} {'min cos':>10s}")
    allrel = []
    for (kind, tname), v in sorted(rows.items()):
        rel = np.array([a[0] for a in v])
        allrel += list(rel)
        worst = max(v, key=lambda a: a[0])
        print(f"{kind:12s} {tname:5s} {len(v):3d} {rel.mean():9.5f} {rel.max():9.5f} "
              f"{max(a[1] for a in v):11.5f} {min(a[2] for a in v):10.7f}   worst {worst[3]}")
    print(f"all products: mean rel {np.mean(allrel):.5f}, max rel {np.max(allrel):.5f}")


# ----------------------------------------------------------------- speed

def build_bench():
    """Configures and builds orcd_bench_matmul; returns the executable's path."""
    bdir = os.environ.get("ORCD_BENCH_BUILD_DIR", os.path.join(ROOT, "build", "bench"))
    subprocess.check_call(["cmake", "-S", ROOT, "-B", bdir, "-DCMAKE_BUILD_TYPE=Release", "-DORCD_PYTHON=OFF",
                           "-DORCD_CUDA=OFF", "-DORCD_BUILD_TESTS=OFF", "-DORCD_BUILD_BENCH=ON"])
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    subprocess.check_call(["cmake", "--build", bdir, "--target", "orcd_bench_matmul", "-j", jobs])
    return os.path.join(bdir, "orcd_bench_matmul")


def speed(args, micro=False):
    exe = build_bench()
    if micro:
        cmd = [exe, "--micro", "1", "4", "16", "--threads", "1"]
    else:
        cmd = [exe, args.model, "1", "512"] + sum([["--threads", str(t)] for t in (1, 2)], [])
    subprocess.check_call(cmd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="accuracy", choices=["accuracy", "speed", "micro"])
    ap.add_argument("--model", default="/root/qwen05.gguf")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.mode == "accuracy":
        accuracy(args)
    else:
        speed(args, micro=args.mode == "micro")


if __name__ == "__main__":
    main()
