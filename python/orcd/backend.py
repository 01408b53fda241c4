"""Which compute backends this installation has, and why not when one is missing."""
from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def _cuda_module():
    """(module or None, reason string)."""
    try:
        from . import _orcd_cuda  # built only where nvcc and cuBLAS were found
    except ImportError as e:
        msg = str(e)
        if importlib.util.find_spec(f"{__package__}._orcd_cuda") is None:  # not built, not a load failure
            return None, ("orcd was built without the CUDA backend (ORCD_CUDA=OFF, or no nvcc / cuBLAS at "
                          "build time); to use an NVIDIA GPU, rebuild it with CUDA from the source: "
                          "ORCD_CUDA=ON pip install . (needs the CUDA toolkit: nvcc and cuBLAS)")
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
