"""The CPU matmul variants chosen at run time (cpp/cpu_features.h, cpp/cpu_kernels.h).

One build holds "scalar", "avx2" (AVX2 + FMA + F16C) and "avx512" (AVX-512
F/BW/VL + VNNI); the best one the CPU runs is used unless ORCD_CPU_KERNEL names
another (lowered to what the CPU runs; an unknown name is a ValueError).

Bounds: every variant quantizes the activations the same way and forms the same
integer block sums, so two variants differ only in float32 summation order:
    |y_variant - y_scalar| <= 4 * n_in * 2^-24 * sum_k |x_k * w_k|  (+ the
    activation-quantization term for the integer kernels, as in test_matmul.py)
and each must also meet test_matmul.py's bound against the float64 NumPy
product. The engine's logits under every variant meet test_cpu_engine.py's
cosine bound against the NumPy reference model.

Which variants the CPU runs is checked against /proc/cpuinfo (an independent
reading of CPUID). That the core holds AVX instructions only inside the avx2 /
avx512 variants (so the wheel runs on any x86-64) is ctest's orcd_cpu_isa
(tests/cpu_isa_check.py: it needs the objects' local symbols), and, end to end,
the installed package run by QEMU's user-mode emulator as a CPU without AVX-512
(Haswell: it must pick avx2) and without AVX (Nehalem: scalar): the same greedy
tokens as on this CPU, no illegal instruction (skipped without qemu-x86_64;
.ci/run installs qemu-user, so CI runs it against the wheel it built).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gguf.constants import GGMLQuantizationType as QT

orcd = pytest.importorskip("orcd")
from orcd import _orcd  # noqa: E402
from test_matmul import ALL_TYPES, INT_KERNEL, error_bound, make_acts, make_weights  # noqa: E402

VARIANTS = ["scalar", "avx2", "avx512"]
SUPPORTED = _orcd.cpu_kernels()


def _needs(variant):
    if variant not in SUPPORTED:
        pytest.skip(f"this CPU does not run the {variant} kernels")


@pytest.fixture
def use_kernel():
    """use_kernel(name): switch the process to that variant; back to the default afterwards."""
    def use(name):
        got = _orcd.set_cpu_kernel(name)
        assert got == name == _orcd.cpu_kernel()
    yield use
    _orcd.set_cpu_kernel("")


def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_supported_variants_match_cpuinfo():
    assert SUPPORTED[0] == "scalar" and SUPPORTED == VARIANTS[:len(SUPPORTED)]
    assert _orcd.cpu_kernel() in SUPPORTED
    flags = _cpuinfo_flags()
    if flags is None or platform.machine() not in ("x86_64", "AMD64", "i686"):
        pytest.skip("no x86 /proc/cpuinfo here")
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    assert ("avx2" in SUPPORTED) == avx2
    assert ("avx512" in SUPPORTED) == avx512
    if "ORCD_CPU_KERNEL" not in os.environ:  # the default is the best the CPU runs
        assert _orcd.cpu_kernel() == SUPPORTED[-1]


@pytest.mark.parametrize("variant", VARIANTS[1:])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_variant_matches_scalar(use_kernel, variant, qtype):
    _needs(variant)
    rng = np.random.default_rng(7)
    B = 256 if qtype in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K) else 32
    n_in, n_out = 2 * 256 + (0 if B == 256 else 32), 37
    raw, W = make_weights(rng, qtype, n_in, n_out)
    # m = 1 (decode), small tiles with a remainder, and m >= 16 (the packed avx512 path)
    for m in (1, 3, 5, 16, 27):
        x = make_acts(rng, m, n_in)
        use_kernel("scalar")
        ys = _orcd.matmul(int(qtype), raw, n_in, n_out, x, 2)
        use_kernel(variant)
        yv = _orcd.matmul(int(qtype), raw, n_in, n_out, x, 2)
        ref = x.astype(np.float64) @ W.T
        bound = error_bound(qtype, x, W)
        for name, y in (("scalar", ys), (variant, yv)):
            err = np.abs(y - ref)
            assert np.all(err <= bound), f"{name} m={m}: worst excess {np.max(err - bound):.3g}"
        absprod = np.abs(x.astype(np.float64)) @ np.abs(W).T
        sum_term = absprod + (bound if qtype in INT_KERNEL else 0)
        diff_bound = 4 * n_in * 2.0 ** -24 * sum_term + 1e-30
        diff = np.abs(yv - ys)
        assert np.all(diff <= diff_bound), f"m={m}: {variant} vs scalar, worst excess {np.max(diff - diff_bound):.3g}"


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda t: t.name)
def test_packed_tiles_agree_bitwise_across_simd_variants(use_kernel, qtype):
    """m >= 16 takes the packed tiles in both SIMD variants (avx512: vpdpwssd over 16 output rows
    and 8 activation rows; avx2: vpmaddwd + vpaddd over each half of 8 rows and 6 activation
    rows): the same integer sums and the same float operations per output, so the same bits,
    for whole and partial tiles (n_out 37 = 2 x 16 + 5, 24 = 16 + 8)."""
    _needs("avx512")
    rng = np.random.default_rng(11)
    B = 256 if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K) else 32
    n_in = 2 * 256 + (0 if B == 256 else 64)
    for n_out in (37, 24):
        raw, _ = make_weights(rng, qtype, n_in, n_out)
        for m in (16, 23, 40):
            x = make_acts(rng, m, n_in)
            use_kernel("avx2")
            a = _orcd.matmul(int(qtype), raw, n_in, n_out, x, 2)
            use_kernel("avx512")
            b = _orcd.matmul(int(qtype), raw, n_in, n_out, x, 2)
            np.testing.assert_array_equal(a, b, err_msg=f"n_out={n_out} m={m}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("wtype", ["F16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K"])
def test_engine_matches_reference_under_every_variant(tiny_model, use_kernel, variant, wtype):
    _needs(variant)
    from reference_qwen2 import Qwen2Reference
    from test_cpu_engine import compare_trace

    use_kernel(variant)
    path = tiny_model(wtype)
    eng = _orcd.CpuEngine(path, 64)
    assert eng.info()["cpu_kernel"] == variant
    ids = np.random.default_rng(3).integers(0, eng.info()["n_vocab"], size=20).tolist()  # 20 rows: packed path
    compare_trace(eng, Qwen2Reference(path), ids)


def test_set_cpu_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match="'sse9' is not a CPU kernel variant: use scalar, avx2 or avx512"):
        _orcd.set_cpu_kernel("sse9")
    assert _orcd.cpu_kernel() in SUPPORTED


def _in_fresh_process(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_override_picks_the_variant(tiny_model, variant):
    path = tiny_model("Q8_0")
    r = _in_fresh_process(
        "from orcd import _orcd; e = _orcd.CpuEngine(%r, 32); print(_orcd.cpu_kernel(), e.info()['cpu_kernel'])" % path,
        ORCD_CPU_KERNEL=variant)
    assert r.returncode == 0, r.stderr
    want = variant if variant in SUPPORTED else SUPPORTED[-1]  # lowered to what the CPU runs
    assert r.stdout.split() == [want, want]
    if variant not in SUPPORTED:
        assert f"ORCD_CPU_KERNEL={variant}" in r.stderr


def test_env_override_unknown_name_is_a_clear_error(tiny_model):
    path = tiny_model("Q8_0")
    code = ("import orcd\n"
            "try:\n"
            "    orcd.Model(%r, device='cpu')\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n") % path
    r = _in_fresh_process(code, ORCD_CPU_KERNEL="avx9000")
    assert r.returncode == 0, r.stderr
    assert "ValueError: ORCD_CPU_KERNEL 'avx9000' is not a CPU kernel variant" in r.stdout


def test_model_info_and_bench_report_the_variant(tiny_model):
    import json

    path = tiny_model("Q8_0")
    m = orcd.Model(path, device="cpu", n_ctx=32)
    assert m.info["cpu_kernel"] == _orcd.cpu_kernel()
    r = subprocess.run([sys.executable, "-m", "orcd", "bench", "-m", path, "--device", "cpu", "-p", "8", "-n", "2",
                        "--repeat", "1", "--json"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, ORCD_CPU_KERNEL="scalar"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cpu_kernel"] == "scalar"


def test_cublas_is_preloaded_only_for_the_cuda_module(tmp_path):
    """orcd/backend.py loads cuBLAS from the nvidia-cublas wheel right before orcd._orcd_cuda
    is imported (the wheel's module finds libcublas.so.13 that way wherever `nvidia` is
    installed), and not on `import orcd`."""
    try:
        import nvidia  # noqa: F401
        have = any(os.path.exists(os.path.join(p, "cu13", "lib", "libcublas.so.13")) for p in nvidia.__path__)
    except ImportError:
        have = False
    if not have or not os.path.exists("/proc/self/maps"):
        pytest.skip("no nvidia-cublas (CUDA 13) wheel here, or no /proc")
    (tmp_path / "_orcd_cuda.cpython-fake.so").write_bytes(b"")
    code = ("import orcd, orcd.backend as b\n"
            "loaded = lambda: 'libcublas.so.13' in open('/proc/self/maps').read()\n"
            "print(loaded())\n"
            "b._CublasBeforeCudaModule().find_spec('orcd._orcd_cuda', [%r])\n"
            "print(loaded())\n") % str(tmp_path)
    r = _in_fresh_process(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]


_EMULATED_CHILD = r"""
import json, sys
import numpy as np
import orcd._orcd as c
out = []
for path in sys.argv[1:]:
    e = c.CpuEngine(path, 64, 1, 1)
    ids = np.array([3, 17, 5, 42, 9, 11], np.int32)
    logits = e.forward(0, ids, 0)
    first = int(np.argmax(logits))
    out.append([first] + [int(t) for t in e.decode_greedy(0, first, len(ids), 6)])
print(json.dumps({"kernel": c.cpu_kernel(), "available": list(c.cpu_kernels()), "tokens": out}))
"""


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="qemu-x86_64 not installed (apt-get install qemu-user)")
@pytest.mark.parametrize("cpu,variant", [("Haswell", "avx2"), ("Nehalem", "scalar")])
def test_emulated_cpu_picks_its_variant_and_gives_the_same_tokens(tiny_model, cpu, variant):
    """This interpreter and its orcd (in CI: the wheel .ci/run built) under `qemu-x86_64 -cpu
    CPU`, whose CPUID lacks AVX-512 (Haswell) or AVX (Nehalem): the dispatch picks that CPU's
    best variant, nothing executes an instruction the CPU lacks (QEMU would stop it with
    SIGILL), and greedy tokens of models of several block types equal this CPU's own."""
    paths = [tiny_model(t) for t in ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "F16")]

    def run(prefix):
        env = {k: v for k, v in os.environ.items() if k != "ORCD_CPU_KERNEL"}
        p = subprocess.run(prefix + [sys.executable, "-c", _EMULATED_CHILD, *paths], capture_output=True,
                           text=True, timeout=600, env=env)
        assert p.returncode == 0, f"{prefix or 'native'}: exit {p.returncode}\n{p.stderr[-2000:]}"
        return json.loads(p.stdout.strip().splitlines()[-1])

    native = run([])
    emu = run([shutil.which("qemu-x86_64"), "-cpu", cpu])
    assert emu["kernel"] == variant, emu
    assert "avx512" not in emu["available"] and (variant != "scalar" or emu["available"] == ["scalar"])
    assert emu["tokens"] == native["tokens"]
