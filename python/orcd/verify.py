"""`orcd verify`: the CPU and GPU engines side by side, layer by layer.

For each prompt, both engines trace the same token ids (hidden state after
the embedding and after every layer, then the logits); the table shows the
cosine and max |difference| per layer and where they first diverge beyond
the tolerance. Exit code 1 on divergence or argmax mismatch.

`--prompt-tokens N` adds a long prompt of exactly N tokens (orcd's own Python
sources, repeated as needed): the prompt path's chunks, long-cache attention and
RoPE at large positions, compared at every position of every layer. Prompts longer
than LAST_ROW_ONLY tokens compare the last row's logits only (all rows' logits of a
16k prompt would be 10 GB per engine).
"""
from __future__ import annotations

import sys

import numpy as np

DEFAULT_PROMPTS = [
    "<|im_start|>user\nWrite a haiku about GPU computing<|im_end|>\n<|im_start|>assistant\n",
    "def quicksort(arr):",
]


LAST_ROW_ONLY = 2048


def long_prompt_ids(tok, n: int) -> np.ndarray:
    """n token ids of orcd's own Python sources (this package's files in name order,
    repeated as needed): the same ids on every machine with the same orcd."""
    import pathlib
    if n < 1:
        raise ValueError(f"--prompt-tokens must be >= 1, got {n}")
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(pathlib.Path(__file__).parent.glob("*.py")))
    ids = np.asarray(tok.encode(text, special=False), np.int32)
    reps = -(-n // len(ids))
    return np.tile(ids, reps)[:n]


def _cos(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def compare(cpu_trace, gpu_trace, tol: float):
    """Rows (label, cosine, max abs diff, ok) and the label where it first diverges (or None)."""
    (ch, cl), (gh, gl) = cpu_trace, gpu_trace
    rows, first_bad = [], None
    for i, (a, b) in enumerate(zip(ch, gh)):
        label = "embedding" if i == 0 else f"layer {i - 1}"
        c = _cos(a, b)
        rows.append((label, c, float(np.max(np.abs(a - b))), c >= tol))
    c = _cos(cl, gl)
    argmax_ok = bool(np.all(np.argmax(cl, axis=-1) == np.argmax(gl, axis=-1)))
    rows.append(("logits", c, float(np.max(np.abs(cl - gl))), c >= tol and argmax_ok))
    for label, _, _, ok in rows:
        if not ok:
            first_bad = label
            break
    return rows, first_bad, argmax_ok


def run(a) -> int:
    from .backend import cuda_module, cuda_status
    from .default_model import resolve_model
    from .gguf_file import GGUFFile
    from .tokenizer import Tokenizer
    from . import _orcd

    if cuda_status():  # before assembling or reading any model
        print(f"orcd verify: CUDA is not available: {cuda_status()}", file=sys.stderr)
        return 2
    path = resolve_model(a.model)
    with GGUFFile(path) as f:
        tok = Tokenizer.from_metadata(f.metadata)
    texts = a.prompt or ([] if a.prompt_tokens else DEFAULT_PROMPTS)
    runs = [(repr(p), np.asarray(tok.encode(p, special=True), np.int32)) for p in texts]
    if a.prompt_tokens:
        runs.append((f"<{a.prompt_tokens} tokens of orcd's sources>", long_prompt_ids(tok, a.prompt_tokens)))
    n_ctx = max(64, max(len(ids) for _, ids in runs) + 1)
    cpu = _orcd.CpuEngine(path, n_ctx)
    gpu = cuda_module().CudaEngine(path, n_ctx, 1)
    failed = False
    worst = 1.0
    for name, ids in runs:
        all_logits = len(ids) <= LAST_ROW_ONLY
        rows, first_bad, argmax_ok = compare(cpu.trace(ids, all_logits), gpu.trace(ids, all_logits), a.tolerance)
        print(f"prompt: {name} ({len(ids)} tokens{'' if all_logits else '; logits of the last row'})")
        print(f"  {'where':<10} {'cosine':>10} {'max|diff|':>11}")
        for label, c, d, ok in rows:
            worst = min(worst, c)
            print(f"  {label:<10} {c:>10.6f} {d:>11.4g}{'' if ok else '   <-- beyond tolerance'}")
        if first_bad:
            failed = True
            print(f"  FIRST DIVERGENCE: {first_bad} (tolerance cosine >= {a.tolerance})"
                  + ("" if argmax_ok else "; argmax differs"))
        else:
            print("  ok: every layer within tolerance, same argmax")
    print(f"worst cosine: {worst:.6f}  ->  {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0
