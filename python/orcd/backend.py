"""Which compute backends this installation has, and why not when one is missing."""
from __future__ import annotations

import ctypes
import functools
import glob
import importlib.abc
import importlib.util
import os
import sys

# The cuBLAS libraries the CUDA backend links (CUDA 13), in load order (libcublas needs libcublasLt).
_CUBLAS_LIBS = ("libcublasLt.so.13", "libcublas.so.13")


def _preload_cublas() -> str:
    """Loads cuBLAS from the nvidia-cublas wheel (site-packages/nvidia/cu13/lib), wherever
    Python finds the `nvidia` package (a venv's, the user's or the system's site-packages),
    so that orcd._orcd_cuda resolves libcublas.so.13 by name. Returns the folder it
    loaded from, or '' when the wheel is not installed (then the module's RPATH and
    the system's library path are all there is)."""
    try:
        import nvidia  # namespace package of the NVIDIA wheels
    except ImportError:
        return ""
    for base in list(getattr(nvidia, "__path__", [])):
        lib = os.path.join(base, "cu13", "lib")
        if all(glob.glob(os.path.join(lib, name)) for name in _CUBLAS_LIBS):
            for name in _CUBLAS_LIBS:
                ctypes.CDLL(os.path.join(lib, name), mode=ctypes.RTLD_GLOBAL)
            return lib
    return ""


@functools.lru_cache(maxsize=None)
def _preload_cublas_once() -> tuple:
    """(folder cuBLAS was loaded from or '', error message or '')."""
    try:
        return _preload_cublas(), ""
    except OSError as e:  # a broken or foreign-architecture nvidia-cublas install
        return "", str(e)


class _CublasBeforeCudaModule(importlib.abc.MetaPathFinder):
    """Loads cuBLAS just before orcd._orcd_cuda is imported, by whatever code imports it
    (cuda_module() below, or `from orcd import _orcd_cuda`), so that `import orcd` alone
    does not pay for it (~0.5 s and ~150 MB). Finds nothing itself."""

    def find_spec(self, name, path=None, target=None):
        if name == f"{__package__}._orcd_cuda" and path:
            if any(glob.glob(os.path.join(p, "_orcd_cuda*")) for p in path):
                _preload_cublas_once()
        return None


if not any(isinstance(f, _CublasBeforeCudaModule) for f in sys.meta_path):
    sys.meta_path.insert(0, _CublasBeforeCudaModule())


@functools.lru_cache(maxsize=None)
def _cuda_module():
    """(module or None, reason string)."""
    if importlib.util.find_spec(f"{__package__}._orcd_cuda") is None:  # not built, not a load failure
        return None, ("orcd was built without the CUDA backend (ORCD_CUDA=OFF, or no nvcc / cuBLAS at "
                      "build time); to use an NVIDIA GPU, install the orcd wheel (pip install 'orcd[cuda]') "
                      "or rebuild from the source with the CUDA toolkit: ORCD_CUDA=ON pip install .")
    cublas_dir, err = _preload_cublas_once()
    if err:
        return None, f"the CUDA backend could not load cuBLAS from the nvidia-cublas wheel: {err}"
    try:
        from . import _orcd_cuda  # built only where nvcc and cuBLAS were found
    except ImportError as e:
        msg = str(e)
        if "libcublas" in msg and not cublas_dir:
            return None, (f"the CUDA backend needs cuBLAS 13 ({msg}): pip install 'orcd[cuda]' "
                          "(or pip install nvidia-cublas)")
        return None, f"the CUDA backend failed to load: {msg}"
    reason = _orcd_cuda.cuda_status()
    return (_orcd_cuda if not reason else None), reason


def cuda_status() -> str:
    """'' when a usable NVIDIA GPU and the CUDA backend are present, else why not."""
    return _cuda_module()[1]


def cuda_available() -> bool:
    """True when a usable NVIDIA GPU and the CUDA backend are present (see cuda_status)."""
    return _cuda_module()[0] is not None


def cuda_module():
    """The orcd._orcd_cuda module; RuntimeError saying why when CUDA is unusable."""
    mod, reason = _cuda_module()
    if mod is None:
        raise RuntimeError(f"CUDA is not available: {reason}")
    return mod


def cuda_family_refused(err: BaseException) -> bool:
    """True when the CUDA engine refused a model because it does not run that family (or one
    of its features) yet: device="auto" then falls back to the CPU engine, which runs it."""
    return "the CUDA engine does not run" in str(err)


def open_on_device(device: str, on_cuda, on_cpu) -> tuple:
    """(on_cuda() or on_cpu(), the device it runs on) for device "auto", "cuda" or "cpu".
    "auto" takes CUDA when it is available and falls back to the CPU, with a note on stderr,
    when the CUDA engine refuses the model's family; "cuda" without CUDA is a RuntimeError."""
    auto = device == "auto"
    if auto:
        device = "cuda" if cuda_available() else "cpu"
    if device == "cuda":
        if not cuda_available():
            raise RuntimeError(f"device='cuda' requested but CUDA is not available: {cuda_status()}")
        try:
            return on_cuda(), "cuda"
        except ValueError as e:
            if not (auto and cuda_family_refused(e)):
                raise
            print(f"orcd: {e}; running on the CPU", file=sys.stderr)
    return on_cpu(), "cpu"
