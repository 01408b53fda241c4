"""orcd imports everywhere and says why CUDA is or is not usable."""
import subprocess
import sys

import pytest

import orcd


def test_cuda_status_is_consistent():
    status = orcd.cuda_status()
    assert isinstance(status, str)
    assert orcd.cuda_available() == (status == "")
    if status:
        # a reason a person can act on, never an empty or generic failure
        assert len(status) > 10


def test_device_cuda_without_gpu_is_a_clear_error(real_model_path):
    if orcd.cuda_available():
        pytest.skip("this machine has a usable GPU")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        orcd.Model(real_model_path, device="cuda")


def test_device_auto_falls_back_to_cpu(real_model_path):
    if orcd.cuda_available():
        pytest.skip("this machine has a usable GPU")
    with orcd.Model(real_model_path, device="auto", n_ctx=64) as m:
        assert m.device == "cpu"


def test_bad_device_name():
    with pytest.raises(ValueError, match="device"):
        orcd.Model("whatever.gguf", device="tpu")


def test_import_is_light():
    """`import orcd` loads the native core but not the tokenizer stack or CUDA."""
    code = "import sys, orcd; print('tokenizers' in sys.modules, 'orcd._orcd_cuda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
