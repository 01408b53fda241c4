"""A plain NumPy GPT-OSS forward pass (HF transformers' GptOssForCausalLM, with YaRN
as llama.cpp computes it), the independent reference for orcd's gpt-oss family.
float64 by default; only gguf (GGUFReader + gguf.quants.dequantize) and NumPy.

From the HF model definition (modeling_gpt_oss.py), per layer:
    h = RMSNorm(x, attn_norm)
    q, k, v = h W^T + b                       (biases on all three)
    q, k = RoPE-NEOX with YaRN frequencies, cos/sin x attention_scaling
    a = causal GQA attention, scores / sqrt(head_dim); on sliding layers query t sees
        keys t - window < s <= t; each head's sink logit is appended to every score row
        before the softmax and its column dropped after (GptOssAttention: sinks)
    x = x + (concat(a) Wo^T + bo)
    h = RMSNorm(x, post_attention_norm)       (the pre-FFN norm)
    router: l = h Wr^T + br; top-k by l; w = softmax of those k values (GptOssTopKRouter)
    expert e: g = h Wg_e^T + bg_e, u = h Wu_e^T + bu_e,
              g = min(g, limit), u = clip(u, -limit, limit), alpha 1.702, limit 7
              y = (g * sigmoid(alpha g) * (u + 1)) Wd_e^T + bd_e   (GptOssExperts)
    x = x + sum_k w_k y_k
logits = RMSNorm(x, output_norm) Wout^T.
Layer l is sliding when l % pattern < pattern - 1 (pattern 2: HF layer_types alternate
"sliding_attention", "full_attention", starting with sliding).

YaRN (transformers' _compute_yarn_parameters): inv_freq = interp * (1 - e) + extrap * e
with extrap = base^(-2i/d), interp = extrap / factor, e = 1 - clip((i - low) / (high -
low), 0, 1), low/high the correction range of beta_fast 32 / beta_slow 1 over
original_max_position_embeddings; attention_scaling = 0.1 ln(factor) + 1. The range is
floored / ceiled (truncate=True) as llama.cpp always does; the gpt-oss HF config says
truncate=False, which the `truncate` knob reproduces (tests show the two differ).

GGUF layout (llama.cpp's converter): the HF gate_up_proj's interleaved columns are
split into ffn_gate_exps (even) and ffn_up_exps (odd); 3-D expert tensors read back
as (n_expert, n_out, n_in) and their biases as (n_expert, n_out).
"""
from __future__ import annotations

import math

import numpy as np

from reference_phi3 import windowed_attention
from reference_qwen2 import Qwen2Reference, rms_norm

__all__ = ["GptOssReference", "yarn_inv_freq", "swiglu_oai", "route"]

ALPHA, LIMIT = 1.702, 7.0


def yarn_inv_freq(dim: int, base: float, factor: float, orig_ctx: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, truncate: bool = True) -> np.ndarray:
    def corr_dim(n_rot):
        return (dim * math.log(orig_ctx / (n_rot * 2 * math.pi))) / (2 * math.log(base))
    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrap = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    interp = extrap / factor
    e = 1 - ramp
    return interp * (1 - e) + extrap * e


def rope_neox_freqs(x: np.ndarray, positions, inv_freq: np.ndarray, mscale: float) -> np.ndarray:
    """NEOX rotation of x (n, heads, d) by angles pos * inv_freq, cos/sin times mscale."""
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    cos = (np.cos(ang) * mscale)[:, None, :]
    sin = (np.sin(ang) * mscale)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def swiglu_oai(g: np.ndarray, u: np.ndarray, clamp: bool = True) -> np.ndarray:
    if clamp:
        g = np.minimum(g, LIMIT)
        u = np.clip(u, -LIMIT, LIMIT)
    return g * (1.0 / (1.0 + np.exp(-ALPHA * g))) * (u + 1)


def route(logits: np.ndarray, k: int):
    """(experts (n, k) by descending logit, weights (n, k): softmax of those logits)."""
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, idx, axis=-1)
    e = np.exp(top - top.max(axis=-1, keepdims=True))
    return idx, e / e.sum(axis=-1, keepdims=True)


class GptOssReference(Qwen2Reference):
    """Knobs for tests that show what the engine's parity depends on: window (None: the
    file's; 0: none), truncate (YaRN range rounding), yarn (False: plain RoPE), clamp
    (swiglu_oai's limit), sinks (False: no sink column), fixed_experts (a list: route every
    token to these experts with equal weights instead of the router)."""

    def __init__(self, path, dtype=np.float64, window=None, truncate=True, yarn=True, clamp=True,
                 sinks=True, fixed_experts=None):
        super().__init__(path, dtype=dtype)
        a = self.arch
        self.head_dim = int(self._meta(f"{a}.attention.key_length"))
        self.window = int(self._meta(f"{a}.attention.sliding_window")) if window is None else window
        pattern = int(self._meta(f"{a}.attention.sliding_window_pattern", 2))
        self.is_local = [l % pattern < pattern - 1 for l in range(self.n_layer)]
        self.n_expert_used = int(self._meta(f"{a}.expert_used_count"))
        self.clamp, self.use_sinks, self.fixed_experts = clamp, sinks, fixed_experts
        self.inv_freq = 1.0 / self.rope_base ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        self.mscale = 1.0
        self.routes = []  # the experts each layer picked, per token (last forward)
        if yarn and self._meta(f"{a}.rope.scaling.type", "none") == "yarn":
            factor = float(self._meta(f"{a}.rope.scaling.factor"))
            orig = int(self._meta(f"{a}.rope.scaling.original_context_length"))
            self.inv_freq = yarn_inv_freq(self.head_dim, self.rope_base, factor, orig, truncate=truncate)
            self.mscale = 0.1 * math.log(factor) + 1.0

    def attention(self, il, x, positions):
        p = f"blk.{il}."
        n, d = x.shape[0], self.head_dim
        q = (x @ self.weight(p + "attn_q.weight").T + self.weight(p + "attn_q.bias")).reshape(n, self.n_head, d)
        k = (x @ self.weight(p + "attn_k.weight").T + self.weight(p + "attn_k.bias")).reshape(n, self.n_head_kv, d)
        v = (x @ self.weight(p + "attn_v.weight").T + self.weight(p + "attn_v.bias")).reshape(n, self.n_head_kv, d)
        q = rope_neox_freqs(q, positions, self.inv_freq, self.mscale)
        k = rope_neox_freqs(k, positions, self.inv_freq, self.mscale)
        sinks = self.weight(p + "attn_sinks.weight") if self.use_sinks else np.full(self.n_head, -np.inf)
        window = self.window if self.is_local[il] else 0
        a = windowed_attention(q, k, v, window, self.kv_head_for, 1.0 / np.sqrt(d), sinks)
        return a.reshape(n, self.n_head * d) @ self.weight(p + "attn_output.weight").T \
            + self.weight(p + "attn_output.bias")

    def ffn(self, il, h):
        p = f"blk.{il}."
        logits = h @ self.weight(p + "ffn_gate_inp.weight").T + self.weight(p + "ffn_gate_inp.bias")
        if self.fixed_experts is None:
            idx, wts = route(logits, self.n_expert_used)
        else:
            idx = np.tile(np.asarray(self.fixed_experts), (h.shape[0], 1))
            wts = np.full(idx.shape, 1.0 / idx.shape[1])
        self.routes.append(idx)
        Wg, Wu, Wd = (self.weight(p + f"ffn_{nm}_exps.weight") for nm in ("gate", "up", "down"))
        bg, bu, bd = (self.weight(p + f"ffn_{nm}_exps.bias") for nm in ("gate", "up", "down"))
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            for e, w in zip(idx[t], wts[t]):
                g = Wg[e] @ h[t] + bg[e]
                u = Wu[e] @ h[t] + bu[e]
                out[t] += w * (Wd[e] @ swiglu_oai(g, u, self.clamp) + bd[e])
        return out

    def layer(self, il, x, positions):
        p = f"blk.{il}."
        x = x + self.attention(il, rms_norm(x, self.weight(p + "attn_norm.weight"), self.rms_eps), positions)
        return x + self.ffn(il, rms_norm(x, self.weight(p + "post_attention_norm.weight"), self.rms_eps))

    def forward(self, token_ids, pos0: int = 0, logits: bool = True):
        self.routes = []
        return super().forward(token_ids, pos0, logits)
