"""A plain NumPy Gemma 3 (text) forward pass (HF transformers' Gemma3ForCausalLM),
the independent reference for orcd's gemma3 family.

From the HF model definition:
    x = embed(ids) * sqrt(hidden_size)
    per layer:  h = norm(x); q, k, v = h W^T (no biases);
                q, k = q_norm(q), k_norm(k) per head (RMSNorm over head_dim);
                RoPE (rotate_half) with base rope_local_base_freq (10000) on sliding
                layers and rope_theta on global ones;
                attention scaled by query_pre_attn_scalar^-0.5; on sliding layers
                query t sees keys t - window < s <= t;
                x = x + post_attention_norm(attn);
                x = x + post_feedforward_layernorm(down(gelu_tanh(gate(h)) * up(h)))
                with h = pre_feedforward_layernorm(x)
    logits = final_norm(x) W_emb^T, soft-capped by final_logit_softcapping if set.
Gemma3RMSNorm is x / sqrt(mean(x^2) + eps) * (1 + w). llama.cpp's converter
stores 1 + w in the GGUF, so the HF weight is w = gguf - 1 and this reference
multiplies by 1 + (gguf - 1), written out as HF does.
Layer l is global when l % pattern == pattern - 1 (HF sliding_window_pattern, 6),
or as the per-layer bool array attention.sliding_window_pattern says.
"""
from __future__ import annotations

import numpy as np

from reference_phi3 import windowed_attention
from reference_qwen2 import Qwen2Reference, rope_neox

__all__ = ["Gemma3Reference", "gelu_tanh", "gemma_rms_norm"]


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def gemma_rms_norm(x: np.ndarray, w_gguf: np.ndarray, eps: float) -> np.ndarray:
    w_hf = w_gguf - 1.0  # the converter's +1 undone
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)) * (1.0 + w_hf)


class Gemma3Reference(Qwen2Reference):
    def __init__(self, path, dtype=np.float32):
        super().__init__(path, dtype=dtype)
        a = self.arch
        self.head_dim = int(self._meta(f"{a}.attention.key_length", self.n_embd // self.n_head))
        self.window = int(self._meta(f"{a}.attention.sliding_window", 0))
        pat = self.reader.fields.get(f"{a}.attention.sliding_window_pattern")
        if pat is None:
            self.is_local = [l % 6 != 5 for l in range(self.n_layer)]
        elif len(pat.data) > 1 or pat.types[0].name == "ARRAY":
            self.is_local = [bool(pat.contents(i)) for i in range(len(pat.data))]
        else:
            n = int(pat.contents())
            self.is_local = [l % n != n - 1 for l in range(self.n_layer)]
        self.rope_local = float(self._meta(f"{a}.rope.freq_base_swa", 10000.0))
        self.qpas = float(self._meta(f"{a}.attention.query_pre_attn_scalar", float(self.head_dim)))
        self.softcap = float(self._meta(f"{a}.final_logit_softcapping", 0.0))

    def norm(self, x, name):
        return gemma_rms_norm(x, self.weight(name), self.rms_eps)

    def embed(self, token_ids):
        x = super().embed(token_ids)
        return x * np.asarray(np.sqrt(self.n_embd), dtype=x.dtype)

    def attention(self, il: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        n, d = x.shape[0], self.head_dim
        local = self.window > 0 and self.is_local[il]
        base = self.rope_local if local else self.rope_base
        q = (x @ self.weight(p + "attn_q.weight").T).reshape(n, self.n_head, d)
        k = (x @ self.weight(p + "attn_k.weight").T).reshape(n, self.n_head_kv, d)
        v = (x @ self.weight(p + "attn_v.weight").T).reshape(n, self.n_head_kv, d)
        q = rope_neox(self.norm(q, p + "attn_q_norm.weight"), positions, base)
        k = rope_neox(self.norm(k, p + "attn_k_norm.weight"), positions, base)
        out = windowed_attention(q, k, v, self.window if local else 0, self.kv_head_for, self.qpas ** -0.5)
        return out.reshape(n, self.n_head * d) @ self.weight(p + "attn_output.weight").T

    def layer(self, il: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        a = self.attention(il, self.norm(x, p + "attn_norm.weight"), positions)
        x = x + self.norm(a, p + "post_attention_norm.weight")
        h = self.norm(x, p + "ffn_norm.weight")
        g = h @ self.weight(p + "ffn_gate.weight").T
        u = h @ self.weight(p + "ffn_up.weight").T
        f = (gelu_tanh(g) * u) @ self.weight(p + "ffn_down.weight").T
        return x + self.norm(f, p + "post_ffw_norm.weight")

    def forward(self, token_ids, pos0: int = 0, logits: bool = True):
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        positions = np.arange(pos0, pos0 + ids.size)
        x = self.embed(ids)
        hidden = [x.copy()]
        for il in range(self.n_layer):
            x = self.layer(il, x, positions)
            hidden.append(x.copy())
        if not logits:
            return hidden, None
        out = self.norm(x, "output_norm.weight") @ self.output_weight().T
        if self.softcap > 0:
            out = self.softcap * np.tanh(out / self.softcap)
        return hidden, out
