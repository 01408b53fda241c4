"""orcd.GGUFFile: the Python face of the C++ GGUF reader (cpp/gguf.cpp)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # numpy is imported by the arrays themselves; `orcd inspect` never needs it
    import numpy as np

from . import _orcd


class TensorInfo(NamedTuple):
    name: str
    shape: tuple  # ne order: shape[0] is the contiguous axis
    type: str  # ggml type name, e.g. "Q4_K"
    type_id: int
    offset: int  # from the start of the data section
    nbytes: int


class GGUFFile:
    """A GGUF file mapped read-only and validated on open.

    >>> with orcd.GGUFFile("model.gguf") as f:
    ...     f.metadata["general.architecture"], f.tensors[0].shape
    """

    def __init__(self, path):
        self._f = _orcd.GGUFFile(str(path))
        self.path = str(path)
        self._metadata = None
        self._tensors = None

    # ---- header
    @property
    def version(self) -> int:
        return self._f.version

    @property
    def alignment(self) -> int:
        return self._f.alignment

    @property
    def data_offset(self) -> int:
        return self._f.data_offset

    @property
    def file_size(self) -> int:
        return self._f.file_size

    # ---- metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """All key/value pairs: scalars as Python values, numeric arrays as NumPy
        arrays, string arrays as lists of str, nested arrays as lists."""
        if self._metadata is None:
            self._metadata = dict(self._f.metadata_items())
        return self._metadata

    def get(self, key: str, default=None):
        """One metadata value without converting the others (cheap for big files)."""
        if self._metadata is not None:
            return self._metadata.get(key, default)
        v = self._f.metadata_value(key)
        return default if v is None else v

    def metadata_summary(self):
        """[(key, value type, array element type or '', array length)] without conversion."""
        return self._f.metadata_summary()

    # ---- tensors
    @property
    def tensors(self) -> list[TensorInfo]:
        if self._tensors is None:
            self._tensors = [TensorInfo(*t) for t in self._f.tensor_infos()]
        return self._tensors

    def tensor_info(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{self.path}: no tensor named {name!r}")

    def tensor(self, name: str) -> "np.ndarray":
        """The tensor's raw bytes as a read-only uint8 array (no copy)."""
        return self._f.tensor_bytes(name)

    def dequantize(self, name: str) -> "np.ndarray":
        """float32 array of shape ne reversed (row-major [ne1, ne0] for a matrix)."""
        return self._f.dequantize(name)

    def dequantize_rows(self, name: str, r0: int, r1: int) -> "np.ndarray":
        """Rows [r0, r1) (each ne[0] values) as float32 [r1 - r0, ne0]."""
        return self._f.dequantize_rows(name, r0, r1)

    # ---- lifetime
    def close(self):
        """Releases the mapping (views returned by tensor() keep their own reference)."""
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"v{self.version}, {len(self.tensors)} tensors"
        return f"<orcd.GGUFFile {self.path!r} ({state})>"
