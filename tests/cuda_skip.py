"""The module-level guard of the GPU test files: orcd._orcd_cuda, or the whole file skipped
with the reason (the module missing from this build, or no usable GPU and why)."""
import pytest


def cuda_or_skip():
    try:
        from orcd import _orcd_cuda as cu
    except ImportError as e:
        pytest.skip(f"orcd._orcd_cuda is not available: {e}", allow_module_level=True)
    status = cu.cuda_status()
    if status:
        pytest.skip(f"no usable CUDA GPU: {status}", allow_module_level=True)
    return cu
