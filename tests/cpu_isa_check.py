"""Checks that only the avx2 / avx512 CPU kernel variants hold AVX instructions.

    python3 tests/cpu_isa_check.py build/ctest/liborcd_core.a   (ctest runs it: orcd_cpu_isa)

The core is built for baseline x86-64 and the variants carry target attributes
(cpp/cpu_kernels_impl.h). If an AVX instruction sat anywhere else -- say an
inline or template function from a header (std::vector, block_formats.h)
compiled inside a variant and kept by the linker for every caller -- the
library would die with SIGILL on a CPU without AVX. Reads `objdump -d` of
the objects (with their local symbols, unlike the stripped extension module)
and lists every function outside orcd::cpu_avx2 / orcd::cpu_avx512 that uses
a ymm / zmm / mask register or a VEX / EVEX instruction. Exit status 1 then.
"""
from __future__ import annotations

import re
import subprocess
import sys

VARIANT_NAMESPACES = ("orcd::cpu_avx2::", "orcd::cpu_avx512::")
AVX = re.compile(r"%[yz]mm|%k[0-7]\b|^v[a-z]")


def avx_outside_variants(path: str, objdump: str = "objdump") -> tuple:
    """({function: first AVX instruction} outside the variants, functions seen, functions in the variants)."""
    dis = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", path],
                         capture_output=True, text=True, check=True).stdout
    bad, func, n_funcs, n_variant = {}, None, 0, 0
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            n_funcs += 1
            n_variant += any(ns in func for ns in VARIANT_NAMESPACES)
            continue
        if func is None or "\t" not in line or any(ns in func for ns in VARIANT_NAMESPACES):
            continue
        ins = line.split("\t", 1)[1].strip()
        if AVX.search(ins):
            bad.setdefault(func, ins)
    return bad, n_funcs, n_variant


def main(argv) -> int:
    if not argv:
        print(__doc__)
        return 2
    rc = 0
    for path in argv:
        bad, n_funcs, n_variant = avx_outside_variants(path)
        if n_variant == 0:
            print(f"{path}: no functions of the avx2 / avx512 variants found (not the core library?)")
            rc = 1
        for f, ins in bad.items():
            print(f"{path}: {f}: uses AVX outside the kernel variants ({ins})")
            rc = 1
        if rc == 0:
            print(f"{path}: {n_funcs} functions, AVX only in the {n_variant} of the kernel variants")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
