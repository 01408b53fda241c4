"""`orcd verify`: the CPU and GPU engines side by side, layer by layer.

For each prompt, both engines trace the same token ids (hidden state after
the embedding and after every layer, then the logits); the table shows the
cosine and max |difference| per layer and where they first diverge beyond
the tolerance. Exit code 1 on divergence or argmax mismatch.
"""
from __future__ import annotations

import sys

import numpy as np

DEFAULT_PROMPTS = [
    "<|im_start|>user\nWrite a haiku about GPU computing<|im_end|>\n<|im_start|>assistant\n",
    "def quicksort(arr):",
]


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
    prompts = a.prompt or DEFAULT_PROMPTS
    n_ctx = max(64, max(len(tok.encode(p, special=True)) for p in prompts) + 1)
    cpu = _orcd.CpuEngine(path, n_ctx)
    gpu = cuda_module().CudaEngine(path, n_ctx, 1)
    failed = False
    worst = 1.0
    for p in prompts:
        ids = np.asarray(tok.encode(p, special=True), np.int32)
        rows, first_bad, argmax_ok = compare(cpu.trace(ids), gpu.trace(ids), a.tolerance)
        print(f"prompt: {p!r} ({len(ids)} tokens)")
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
