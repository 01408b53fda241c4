"""A plain NumPy Llama forward pass (HF transformers' LlamaForCausalLM), the
independent reference for orcd's llama family (SmolLM2 and friends).

Written from the HF model definition: no biases, RoPE by rotate_half on the HF
layout of the Q/K rows. llama.cpp's converter permutes each head's Q/K rows
(HF row h*d/2 + i, half h, goes to GGUF row 2i + h) so that its "normal"
pairing (x[2i], x[2i+1]) computes the same thing; this reference undoes the
permutation and applies HF's rotation, so it shares no pairing code with the
engine. Everything else is Qwen2Reference (tests/reference_qwen2.py).

    ref = LlamaReference("SmolLM2-135M-Instruct.Q4_1.gguf")
    hidden, logits = ref.forward([1, 4093, 198])
"""
from __future__ import annotations

import numpy as np

from reference_qwen2 import Qwen2Reference, gqa_attention, rope_neox

__all__ = ["LlamaReference", "unpermute_rows"]


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF Q/K rows (n_heads*d, n_in) back to HF order: HF row h*d/2 + i = GGUF row 2i + h."""
    n_out, n_in = w.shape
    d = n_out // n_heads
    return w.reshape(n_heads, d // 2, 2, n_in).swapaxes(1, 2).reshape(n_out, n_in)


class LlamaReference(Qwen2Reference):
    """NumPy forward pass of a llama GGUF (no Q/K/V biases, tied output allowed)."""

    def attention(self, il: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        n, d = x.shape[0], self.head_dim
        wq = unpermute_rows(self.weight(p + "attn_q.weight"), self.n_head)
        wk = unpermute_rows(self.weight(p + "attn_k.weight"), self.n_head_kv)
        q = (x @ wq.T).reshape(n, self.n_head, d)
        k = (x @ wk.T).reshape(n, self.n_head_kv, d)
        v = (x @ self.weight(p + "attn_v.weight").T).reshape(n, self.n_head_kv, d)
        q = rope_neox(q, positions, self.rope_base)  # rotate_half on the HF layout
        k = rope_neox(k, positions, self.rope_base)
        out = gqa_attention(q, k, v, np.arange(n), self.kv_head_for)
        return out.reshape(n, self.n_head * d) @ self.weight(p + "attn_output.weight").T
