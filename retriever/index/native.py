"""Memory-speed scan kernels (native_scan.c: fp16 and SQ8 dot products), compiled once by the C compiler, via ctypes.

No library scans a memory-mapped fp16 table at memory speed on x86: faiss's SQfp16 decode is compute-bound
(60-68% of the read bandwidth on 2 threads), torch's fp16 matvec reads at about half speed, and fbgemm's int8
GEMV needs a packed copy of the codes. The kernels are 100 lines of AVX2; they are compiled on first use into
the geotext cache (atomically, keyed by the source, flags and compiler) and are optional: without a C
compiler or AVX2/FMA/F16C, or with GEOTEXT_NATIVE=0, `available()` is False and search uses faiss.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from retriever._io import atomic_path, cache_root

SOURCE = Path(__file__).with_name("native_scan.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC")
CPU_FLAGS = ("avx2", "fma", "f16c")
T = TypeVar("T")
SQ8_QUERY_LEVELS = (
    64  # int8 query values in [-64, 64]: maddubs' int16 pair sums (<= 2 x 255 x 64) never saturate
)


def _cpu_has_flags() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # not Linux, or no cpuinfo: do not guess
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return all(flag in flags for flag in CPU_FLAGS)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def library_path(compiler: str) -> Path:
    """Where the compiled kernels of this source, these flags and this compiler live in the cache."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    return cache_root() / "native" / f"native_scan-{key}.so"


def _build(compiler: str, target: Path) -> None:
    with atomic_path(target) as tmp:  # a half-written library is never loaded
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True, timeout=120
        )


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, compiled on first use; None where they cannot run (the callers then use faiss)."""
    if os.environ.get("GEOTEXT_NATIVE", "1") == "0" or not _cpu_has_flags() or (cc := _compiler()) is None:
        return None
    try:
        target = library_path(cc)
        if not target.exists():
            _build(cc, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"the native scan kernels could not be built ({error}); faiss scans instead", stacklevel=2
        )
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_size_t
    for name in ("dot_f16", "dot_u8s8"):
        getattr(lib, name).argtypes = [pointer, size, size, pointer, size, pointer, size]
        getattr(lib, name).restype = None
    return lib


def available() -> bool:
    """Whether the native kernels run here (x86 with AVX2, FMA and F16C, and a C compiler)."""
    return library() is not None


KERNELS: dict[np.dtype, tuple[str, np.dtype, np.dtype]] = {  # table dtype -> kernel, query dtype, score dtype
    np.dtype(np.float16): ("dot_f16", np.dtype(np.float32), np.dtype(np.float32)),
    np.dtype(np.uint8): ("dot_u8s8", np.dtype(np.int8), np.dtype(np.int32)),
}


class RowScan:
    """Scores (Q, N) of queries against every row of a C-contiguous table (N, D), fp16 or uint8 SQ8 codes, read
    in place (a memory map works), one row range per thread; ctypes releases the GIL for each call."""

    def __init__(self, table: np.ndarray, threads: int) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the native scan kernels are not available on this machine")
        if table.dtype not in KERNELS or not table.flags.c_contiguous or table.ndim != 2:
            raise ValueError(f"native scans read C-contiguous fp16 or uint8 tables, not {table.dtype}")
        name, self.query_dtype, self.score_dtype = KERNELS[table.dtype]
        self.kernel: Callable[..., None] = getattr(lib, name)
        self.table = table
        n = len(table)
        bounds = np.linspace(0, n, max(1, min(threads, n)) + 1).astype(np.int64)
        self.ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        self._pool = ThreadPoolExecutor(len(self.ranges), "native-scan") if len(self.ranges) > 1 else None

    def scores(
        self, queries: np.ndarray, then: Callable[[np.ndarray, int], T] | None = None
    ) -> list[T] | np.ndarray:
        """queries (Q, D) in the kernel's query dtype -> scores (Q, N) (fp32 for fp16 rows, int32 for codes).

        With then, each thread instead hands its range's scores (Q, R) and first row to then(scores, start) and
        the results come back in range order: a per-range selection runs in parallel with no (Q, N) merge.
        """
        q = np.ascontiguousarray(queries, dtype=self.query_dtype)
        n, dim = self.table.shape
        out = np.empty((len(q), n), dtype=self.score_dtype)  # (Q, N); each range writes its columns

        def one(part: int) -> T | None:
            a, b = self.ranges[part]
            self.kernel(
                self.table[a:b].ctypes.data, b - a, dim, q.ctypes.data, len(q), out[:, a:].ctypes.data, n
            )
            return None if then is None else then(out[:, a:b], a)

        parts = [one(0)] if self._pool is None else list(self._pool.map(one, range(len(self.ranges))))
        return out if then is None else parts  # type: ignore[return-value]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def quantize_sq8_queries(queries: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 queries (Q, D) in [-64, 64] that rank SQ8 codes like the fp32 queries (Q, D) rank the decoded rows.

    q . (offset + scale * code) = q . offset + (q * scale) . code: the first term is the same for every row, so
    (q * scale) ranks the codes; each row is then brought to the full [-64, 64] range (no row changes rank).
    """
    scaled = np.asarray(queries, dtype=np.float32) * scale  # (Q, D)
    peak = np.maximum(np.abs(scaled).max(axis=1, keepdims=True), 1e-30)  # (Q, 1)
    return np.rint(scaled / peak * SQ8_QUERY_LEVELS).astype(np.int8)
