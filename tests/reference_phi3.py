"""A plain NumPy Phi-3 forward pass (HF transformers' Phi3ForCausalLM), the
independent reference for orcd's phi3 family.

From the HF model definition: one qkv_proj (rows q | k | v, GGUF attn_qkv),
one gate_up_proj (rows gate | up, GGUF ffn_up: `gate, up = chunk(2)`, FFN =
down(up * silu(gate))), rotate_half RoPE, no biases; with a sliding window
(phi3.attention.sliding_window) a query at t sees keys t - window < s <= t.
LongRoPE (rope_factors_long/short) is not modelled: orcd refuses those files.
"""
from __future__ import annotations

import numpy as np

from reference_qwen2 import Qwen2Reference, rope_neox, silu

__all__ = ["Phi3Reference", "windowed_attention"]


def windowed_attention(q, k, v, window: int, kv_head_of, scale: float, sinks=None):
    """Causal GQA attention (q (n, H, d), k/v (n, HKV, d), positions 0..n-1) where
    query t sees keys s with s <= t and (window == 0 or t - s < window); scores x scale.
    sinks (gpt-oss; None: none): a logit per head that joins each softmax's max and
    denominator as one more column, which is dropped (it has no value)."""
    n, n_head, d = q.shape
    t = np.arange(n)
    hidden = t[None, :] > t[:, None]
    if window:
        hidden |= (t[:, None] - t[None, :]) >= window
    out = np.empty_like(q)
    for h in range(n_head):
        kvh = kv_head_of(h)
        s = (q[:, h, :] @ k[:, kvh, :].T) * scale
        s = np.where(hidden, -np.inf, s)
        if sinks is not None:
            s = np.concatenate([s, np.full((n, 1), sinks[h])], axis=-1)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        out[:, h, :] = (e / e.sum(axis=-1, keepdims=True))[:, :n] @ v[:, kvh, :]
    return out


class Phi3Reference(Qwen2Reference):
    def __init__(self, path, dtype=np.float32):
        super().__init__(path, dtype=dtype)
        self.window = int(self._meta(f"{self.arch}.attention.sliding_window", 0))

    def attention(self, il: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        n, d = x.shape[0], self.head_dim
        qd, kd = self.n_head * d, self.n_head_kv * d
        qkv = x @ self.weight(p + "attn_qkv.weight").T
        q = rope_neox(qkv[:, :qd].reshape(n, self.n_head, d), positions, self.rope_base)
        k = rope_neox(qkv[:, qd:qd + kd].reshape(n, self.n_head_kv, d), positions, self.rope_base)
        v = qkv[:, qd + kd:].reshape(n, self.n_head_kv, d)
        out = windowed_attention(q, k, v, self.window, self.kv_head_for, 1.0 / np.sqrt(d))
        return out.reshape(n, qd) @ self.weight(p + "attn_output.weight").T

    def ffn(self, il: int, x: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        gate, up = np.split(x @ self.weight(p + "ffn_up.weight").T, 2, axis=-1)
        return (up * silu(gate)) @ self.weight(p + "ffn_down.weight").T
