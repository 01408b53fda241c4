"""Memory sizes as users write them: 4096, "512M", "2G", "2GiB", "1.5GB" (binary units:
K = 1024 bytes, as nvidia-smi and llama.cpp count), for options such as kv_memory."""
import numbers
import re
from typing import Optional, Union

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_bytes(value: Union[None, int, str], name: str = "size") -> Optional[int]:
    """None or 0 -> None (the default); an int >= 0 or a string like "2GiB" -> bytes.
    ValueError naming `name` for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a string such as '2GiB' (got a bool)")
    if isinstance(value, numbers.Integral):
        n = int(value)
    elif isinstance(value, str):
        m = _PATTERN.match(value)
        if not m:
            raise ValueError(f"{name}: cannot read {value!r} as a size (examples: 4096, 512M, 2G, 2GiB)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise TypeError(f"{name} must be an int or a string such as '2GiB' (got {type(value).__name__})")
    if n < 0 or n > 2**63 - 1:
        raise ValueError(f"{name} must be >= 0 bytes (got {value!r})")
    return n or None
