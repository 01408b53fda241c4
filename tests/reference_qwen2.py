"""A plain NumPy Qwen2 forward pass: the independent reference for orcd's engines.

Written from the published Qwen2 architecture, not from any orcd code. It only
uses the ``gguf`` package (GGUFReader + gguf.quants.dequantize) and NumPy.

    ref = Qwen2Reference("model.gguf")
    hidden, logits = ref.forward([151644, 872, 198])
    # hidden: n_layer + 1 arrays (n_tokens, n_embd): after the embedding and
    #         after each layer's second residual add (before output_norm)
    # logits: (n_tokens, n_vocab) over every row of output.weight

Architecture, per layer (x is (n_tokens, n_embd)):
    h  = RMSNorm(x, attn_norm)
    q  = h Wq^T + bq ; k = h Wk^T + bk ; v = h Wv^T + bv
    q, k = RoPE-NEOX(q, k, positions)        pairs (x[i], x[i + d/2]), i < d/2,
                                             angle = pos * base^(-2i/d)
    a  = causal GQA attention, query head h uses kv head h // (n_head/n_head_kv),
         scores scaled by 1/sqrt(d), softmax over keys 0..t
    x  = x + concat(a) Wo^T
    h  = RMSNorm(x, ffn_norm)
    x  = x + (silu(h Wg^T) * (h Wu^T)) Wd^T
then logits = RMSNorm(x, output_norm) Wout^T (Wout = token_embd when output.weight
is absent).  RMSNorm(x, w) = x / sqrt(mean(x^2) + eps) * w.

Knobs for tests of the reference itself: ``rope_style`` ("neox", or the wrong
"adjacent" pairing) and ``gqa_map`` ("div", or the wrong "mod" head mapping).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

__all__ = ["Qwen2Reference", "rms_norm", "rope_neox", "rope_adjacent", "silu", "swiglu", "gqa_attention"]


# ---------------------------------------------------------------- primitives

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w over the last axis."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The FFN's gate: silu(g) * u."""
    return silu(g) * u


def gqa_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: Sequence[int],
                  kv_head_of=None) -> np.ndarray:
    """Causal GQA attention of q (n_q, n_head, d) over k, v (n_kv, n_head_kv, d),
    which hold positions 0 .. n_kv-1: query t sees the keys at positions
    0 .. q_pos[t]. Query head h reads KV head kv_head_of(h) (default
    h // (n_head / n_head_kv)); scores scaled by 1/sqrt(d); softmax with the
    row max subtracted. Returns (n_q, n_head, d)."""
    n_q, n_head, d = q.shape
    n_kv, n_head_kv = k.shape[0], k.shape[1]
    if kv_head_of is None:
        group = n_head // n_head_kv
        kv_head_of = lambda h: h // group  # noqa: E731
    scale = 1.0 / np.sqrt(d)
    mask = np.arange(n_kv)[None, :] > np.asarray(q_pos)[:, None]  # (n_q, n_kv): keys not yet seen
    out = np.empty((n_q, n_head, d), dtype=q.dtype)
    for h in range(n_head):
        kvh = kv_head_of(h)
        s = (q[:, h, :] @ k[:, kvh, :].T) * scale  # (n_q, n_kv)
        s = np.where(mask, -np.inf, s)
        s = s - s.max(axis=-1, keepdims=True)
        e = np.exp(s)
        pr = e / e.sum(axis=-1, keepdims=True)
        out[:, h, :] = pr @ v[:, kvh, :]
    return out


def _rope_angles(positions: np.ndarray, head_dim: int, base: float) -> np.ndarray:
    """angles[t, i] = pos_t * base^(-2i/d), i < d/2 (computed in float64)."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    inv_freq = np.power(float(base), -2.0 * i / head_dim)
    return np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]


def rope_neox(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """NEOX rotation of x (n_tokens, n_heads, d): pairs (x[i], x[i + d/2])."""
    d = x.shape[-1]
    half = d // 2
    ang = _rope_angles(positions, d, base)
    cos = np.cos(ang)[:, None, :].astype(x.dtype)
    sin = np.sin(ang)[:, None, :].astype(x.dtype)
    x1 = x[..., :half]
    x2 = x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def rope_adjacent(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """The GPT-J / "normal" rotation, pairs (x[2i], x[2i+1]). WRONG for Qwen2;
    kept so tests can show the reference is sensitive to the pairing."""
    d = x.shape[-1]
    ang = _rope_angles(positions, d, base)
    cos = np.cos(ang)[:, None, :].astype(x.dtype)
    sin = np.sin(ang)[:, None, :].astype(x.dtype)
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


# ---------------------------------------------------------------- the model

class Qwen2Reference:
    """NumPy forward pass of a qwen2 GGUF.

    Parameters
    ----------
    path: the GGUF file.
    dtype: activation/weight dtype for the math (np.float32 default; np.float64
        for tight comparisons on small models).
    rope_style: "neox" (correct) or "adjacent" (deliberately wrong variant).
    gqa_map: "div" (correct: kv head = h // group) or "mod" (wrong: h % n_head_kv).
    """

    def __init__(self, path, dtype=np.float32, rope_style: str = "neox",
                 gqa_map: str = "div"):
        self.path = os.fspath(path)
        self.dtype = np.dtype(dtype)
        if rope_style not in ("neox", "adjacent"):
            raise ValueError(f"rope_style must be 'neox' or 'adjacent', not {rope_style!r}")
        if gqa_map not in ("div", "mod"):
            raise ValueError(f"gqa_map must be 'div' or 'mod', not {gqa_map!r}")
        self.rope_style = rope_style
        self.gqa_map = gqa_map
        self.reader = GGUFReader(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._cache: Dict[str, np.ndarray] = {}

        self.arch = self._meta("general.architecture")
        a = self.arch
        self.n_layer = int(self._meta(f"{a}.block_count"))
        self.n_embd = int(self._meta(f"{a}.embedding_length"))
        self.n_ff = int(self._meta(f"{a}.feed_forward_length"))
        self.n_head = int(self._meta(f"{a}.attention.head_count"))
        self.n_head_kv = int(self._meta(f"{a}.attention.head_count_kv", self.n_head))
        self.rope_base = float(self._meta(f"{a}.rope.freq_base", 10000.0))
        self.rms_eps = float(self._meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-6))
        self.head_dim = self.n_embd // self.n_head
        if self.head_dim * self.n_head != self.n_embd:
            raise ValueError("n_embd is not a multiple of n_head")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head is not a multiple of n_head_kv")
        emb = self.tensors["token_embd.weight"]
        self.n_vocab = int(emb.shape[1])  # ne = [n_embd, n_vocab]
        self.tied_output = "output.weight" not in self.tensors

    # --- metadata / tensors -------------------------------------------------
    def _meta(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            if default is None:
                raise KeyError(f"{self.path}: metadata key {key!r} missing")
            return default
        return f.contents()

    def tensor_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def _dequant_tensor(self, t, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """float32 array of shape (ne[-1], ..., ne[0]); optionally only some rows
        of a 2-D tensor."""
        ne = [int(n) for n in t.shape]
        qtype = GGMLQuantizationType(int(t.tensor_type))
        data = t.data
        if len(ne) == 2:
            data = data.reshape(ne[1], -1)  # one row per output feature
            if rows is not None:
                data = data[rows]
            out = dequantize(data, qtype)
            return np.asarray(out, dtype=np.float32).reshape(data.shape[0], ne[0])
        out = dequantize(data, qtype)
        return np.asarray(out, dtype=np.float32).reshape(tuple(reversed(ne)))

    def weight(self, name: str) -> np.ndarray:
        """Dequantized tensor (cached), in self.dtype, shape = ne reversed."""
        w = self._cache.get(name)
        if w is None:
            if name not in self.tensors:
                raise KeyError(f"{self.path}: tensor {name!r} missing")
            w = self._dequant_tensor(self.tensors[name]).astype(self.dtype, copy=False)
            self._cache[name] = w
        return w

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        """Rows of token_embd for the ids (dequantizes only those rows unless the
        whole matrix is already cached, e.g. for a tied output)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise IndexError(f"token id out of range [0, {self.n_vocab})")
        name = "token_embd.weight"
        if name in self._cache:
            return self._cache[name][ids]
        return self._dequant_tensor(self.tensors[name], rows=ids).astype(self.dtype)

    def output_weight(self) -> np.ndarray:
        return self.weight("token_embd.weight" if self.tied_output else "output.weight")

    # --- forward ------------------------------------------------------------
    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.rope_style == "neox":
            return rope_neox(x, positions, self.rope_base)
        return rope_adjacent(x, positions, self.rope_base)

    def kv_head_for(self, h: int) -> int:
        if self.gqa_map == "div":
            return h // (self.n_head // self.n_head_kv)
        return h % self.n_head_kv

    def attention(self, il: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Self-attention block of layer il on normed input x (n, n_embd); the
        tokens are one causal sequence with the given positions."""
        p = f"blk.{il}."
        n = x.shape[0]
        d = self.head_dim
        q = x @ self.weight(p + "attn_q.weight").T + self.weight(p + "attn_q.bias")
        k = x @ self.weight(p + "attn_k.weight").T + self.weight(p + "attn_k.bias")
        v = x @ self.weight(p + "attn_v.weight").T + self.weight(p + "attn_v.bias")
        q = self._rope(q.reshape(n, self.n_head, d), positions)
        k = self._rope(k.reshape(n, self.n_head_kv, d), positions)
        v = v.reshape(n, self.n_head_kv, d)
        # causal: query t sees keys s <= t (by order in the sequence)
        out = gqa_attention(q, k, v, np.arange(n), self.kv_head_for)
        return out.reshape(n, self.n_head * d) @ self.weight(p + "attn_output.weight").T

    def ffn(self, il: int, x: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        g = x @ self.weight(p + "ffn_gate.weight").T
        u = x @ self.weight(p + "ffn_up.weight").T
        return swiglu(g, u) @ self.weight(p + "ffn_down.weight").T

    def layer(self, il: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        h = rms_norm(x, self.weight(p + "attn_norm.weight"), self.rms_eps)
        x = x + self.attention(il, h, positions)
        h = rms_norm(x, self.weight(p + "ffn_norm.weight"), self.rms_eps)
        return x + self.ffn(il, h)

    def forward(self, token_ids: Sequence[int], pos0: int = 0,
                logits: bool = True) -> Tuple[List[np.ndarray], Optional[np.ndarray]]:
        """Run the tokens as one sequence at positions pos0, pos0+1, ...

        Returns (hidden_states, logits): hidden_states has n_layer + 1 arrays of
        shape (n_tokens, n_embd) -- the embedding, then the residual stream after
        each layer; logits is (n_tokens, n_vocab) (None when logits=False).
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("empty token sequence")
        positions = np.arange(pos0, pos0 + ids.size)
        x = self.embed(ids)
        hidden = [x.copy()]
        for il in range(self.n_layer):
            x = self.layer(il, x, positions)
            hidden.append(x.copy())
        if not logits:
            return hidden, None
        xn = rms_norm(x, self.weight("output_norm.weight"), self.rms_eps)
        return hidden, xn @ self.output_weight().T

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.forward(token_ids)[1]

    def greedy(self, token_ids: Sequence[int], n_new: int,
               stop: Sequence[int] = ()) -> List[int]:
        """Greedy continuation (recomputes the whole prefix each step; small n only)."""
        seq = [int(t) for t in token_ids]
        out: List[int] = []
        for _ in range(n_new):
            nxt = int(np.argmax(self.forward(seq)[1][-1]))
            out.append(nxt)
            seq.append(nxt)
            if nxt in stop:
                break
        return out

    # --- vocabulary (read straight from the GGUF, no tokenizer library) -----
    def vocab(self) -> List[str]:
        f = self.reader.fields["tokenizer.ggml.tokens"]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def info(self) -> dict:
        return dict(arch=self.arch, n_layer=self.n_layer, n_embd=self.n_embd,
                    n_ff=self.n_ff, n_head=self.n_head, n_head_kv=self.n_head_kv,
                    head_dim=self.head_dim, n_vocab=self.n_vocab,
                    rope_base=self.rope_base, rms_eps=self.rms_eps,
                    tied_output=self.tied_output)
