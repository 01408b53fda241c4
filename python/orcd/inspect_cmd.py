"""`orcd inspect`: what a GGUF file holds, without reading tensor data."""
from __future__ import annotations

import json
from collections import Counter

from .gguf_file import GGUFFile

# Metadata keys shown as hyperparameters, relative to "{arch}.".
_HPARAMS = [
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "rope.freq_base",
    "attention.layer_norm_rms_epsilon",
    # shown when present: sliding windows, RoPE scaling, experts (gemma3, gpt-oss)
    "attention.key_length",
    "attention.sliding_window",
    "rope.scaling.type",
    "rope.scaling.factor",
    "expert_count",
    "expert_used_count",
]
_SPECIAL = ["bos", "eos", "padding", "unknown", "eot"]


def describe(f: GGUFFile) -> dict:
    """A JSON-able summary. Converts only small metadata values (no vocab lists)."""
    summary = f.metadata_summary()  # (key, type, elem type, array length)
    arch = f.get("general.architecture")
    hparams = {}
    if arch:
        for k in _HPARAMS:
            v = f.get(f"{arch}.{k}")
            if v is not None:
                hparams[k] = v
    arrays = {k: n for k, t, _, n in summary if t == "array"}
    tok = {
        "model": f.get("tokenizer.ggml.model"),
        "pre": f.get("tokenizer.ggml.pre"),
        "vocab_size": arrays.get("tokenizer.ggml.tokens"),
        "merges": arrays.get("tokenizer.ggml.merges"),
        "add_bos_token": f.get("tokenizer.ggml.add_bos_token"),
    }
    for s in _SPECIAL:
        v = f.get(f"tokenizer.ggml.{s}_token_id")
        if v is not None:
            tok[f"{s}_token_id"] = v
    tensors = [
        {"name": t.name, "type": t.type, "shape": list(t.shape), "nbytes": t.nbytes, "offset": t.offset}
        for t in f.tensors
    ]
    by_type = Counter(t.type for t in f.tensors)
    bytes_by_type = Counter()
    for t in f.tensors:
        bytes_by_type[t.type] += t.nbytes
    return {
        "path": f.path,
        "version": f.version,
        "file_size": f.file_size,
        "alignment": f.alignment,
        "architecture": arch,
        "name": f.get("general.name"),
        "hparams": hparams,
        "tokenizer": tok,
        "chat_template": f.get("tokenizer.chat_template") is not None,
        "metadata_keys": len(summary),
        "tensor_count": len(tensors),
        "tensors": tensors,
        "totals_by_type": {
            k: {"count": by_type[k], "nbytes": bytes_by_type[k]} for k in sorted(by_type, key=lambda k: -by_type[k])
        },
        "total_parameters": sum(_n_elements(t.shape) for t in f.tensors),
        "total_tensor_bytes": sum(t.nbytes for t in f.tensors),
    }


def _n_elements(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_text(d: dict) -> str:
    out = []
    out.append(f"file:          {d['path']} ({_mb(d['file_size'])}, GGUF v{d['version']}, alignment {d['alignment']})")
    out.append(f"architecture:  {d['architecture']}" + (f"  ({d['name']})" if d["name"] else ""))
    for k, v in d["hparams"].items():
        out.append(f"  {k:<34} {v}")
    t = d["tokenizer"]
    out.append(
        f"tokenizer:     {t['model']} (pre={t['pre']}), vocab {t['vocab_size']}, merges {t['merges']}, "
        f"add_bos={t['add_bos_token']}"
    )
    specials = ", ".join(f"{s}={t[f'{s}_token_id']}" for s in _SPECIAL if f"{s}_token_id" in t)
    if specials:
        out.append(f"  special ids: {specials}")
    out.append(f"chat template: {'present' if d['chat_template'] else 'absent'}")
    out.append(f"tensors:       {d['tensor_count']}, {d['total_parameters']:,} parameters, {_mb(d['total_tensor_bytes'])}")
    w = max([len(x["name"]) for x in d["tensors"]] + [4])
    out.append(f"  {'name':<{w}}  {'type':<6} {'shape':<18} {'bytes':>12}")
    for x in d["tensors"]:
        shape = "[" + ", ".join(str(s) for s in x["shape"]) + "]"
        out.append(f"  {x['name']:<{w}}  {x['type']:<6} {shape:<18} {x['nbytes']:>12,}")
    out.append("totals by type:")
    for k, v in d["totals_by_type"].items():
        out.append(f"  {k:<6} x{v['count']:<4} {_mb(v['nbytes']):>12}")
    return "\n".join(out)


def run(path: str, as_json: bool = False) -> str:
    with GGUFFile(path) as f:
        d = describe(f)
    return json.dumps(d, indent=1, default=_json_value) if as_json else format_text(d)


def _json_value(v):
    """Metadata values JSON does not know: NumPy arrays and scalars, bytes."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", errors="replace")
    return repr(v)
