"""Memory-speed scan kernels (native_scan.c: fp16 and SQ8 dot products), compiled once by the C compiler, via ctypes.

No library scans a memory-mapped fp16 table at memory speed on x86: faiss's SQfp16 decode is compute-bound
(60-81% of the read bandwidth on 2 threads), torch's fp16 matvec reads at about 12 GB/s, and fbgemm's int8
GEMV needs a packed copy of the codes. The kernels are ~170 lines of AVX2; they are compiled on first use into
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

import numpy as np

from retriever._io import atomic_path, cache_root

SOURCE = Path(__file__).with_name("native_scan.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC")
CPU_FLAGS = ("avx2", "fma", "f16c")
# int8 query values lie in [-64, 64]: maddubs' int16 pair sums (at most 2 x 255 x 64) never saturate
SQ8_QUERY_LEVELS = 64


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
    signatures = {
        "dot_f16": [pointer, size, size, pointer, size, pointer, size],
        "dot_u8s8": [pointer, size, size, pointer, size, pointer, size],
        "top_f16": [pointer, size, size, pointer, size, size, pointer, pointer],
        "top_u8s8": [pointer, size, size, pointer, size, size, pointer, pointer],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib


def available() -> bool:
    """Whether the native kernels run here (x86 with AVX2, FMA and F16C, and a C compiler)."""
    return library() is not None


KERNELS: dict[np.dtype, tuple[str, str, np.dtype, np.dtype]] = {  # table dtype -> kernels, query/score dtype
    np.dtype(np.float16): ("dot_f16", "top_f16", np.dtype(np.float32), np.dtype(np.float32)),
    np.dtype(np.uint8): ("dot_u8s8", "top_u8s8", np.dtype(np.int8), np.dtype(np.int32)),
}


def row_ranges(n: int, threads: int) -> list[tuple[int, int]]:
    """n rows split into at most `threads` contiguous, non-empty (start, stop) ranges of near-equal size."""
    bounds = np.linspace(0, n, max(1, min(threads, n)) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class RowScan:
    """Queries against every row of a C-contiguous table (N, D), fp16 or uint8 SQ8 codes, read in place (a memory
    map works), one row range per thread (ctypes releases the GIL for each call): all scores, or each range's
    best k."""

    def __init__(self, table: np.ndarray, threads: int) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the native scan kernels are not available on this machine")
        if table.dtype not in KERNELS or not table.flags.c_contiguous or table.ndim != 2 or not len(table):
            raise ValueError(
                f"native scans read non-empty C-contiguous fp16 or uint8 tables, not {table.dtype}"
            )
        name, top_name, self.query_dtype, self.score_dtype = KERNELS[table.dtype]
        self.kernel: Callable[..., None] = getattr(lib, name)
        self.top_kernel: Callable[..., None] = getattr(lib, top_name)
        self.table = table
        self.ranges = row_ranges(len(table), threads)
        self._pool = ThreadPoolExecutor(len(self.ranges), "native-scan") if len(self.ranges) > 1 else None

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """queries (Q, D) in the kernel's query dtype -> scores (Q, N) (fp32 for fp16 rows, int32 for codes)."""
        q = np.ascontiguousarray(queries, dtype=self.query_dtype)
        n, dim = self.table.shape
        out = np.empty((len(q), n), dtype=self.score_dtype)  # (Q, N); each range writes its columns

        def one(part: int) -> None:
            a, b = self.ranges[part]
            self.kernel(
                self.table[a:b].ctypes.data, b - a, dim, q.ctypes.data, len(q), out[:, a:].ctypes.data, n
            )

        self._map(one)
        return out

    def top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each range's k best rows per query, found with no score array: scores (Q, T * k) float64 and rows
        (Q, T * k) int64, unordered, with (-inf, -1) in the slots of a range shorter than k. Within a range,
        ties keep the lower row; merging the ranges by score, then row, gives the whole table's top k."""
        q = np.ascontiguousarray(queries, dtype=self.query_dtype)
        dim, parts = self.table.shape[1], len(self.ranges)
        scores = np.empty((parts, len(q), k), dtype=np.float64)  # (T, Q, k)
        rows = np.empty((parts, len(q), k), dtype=np.int64)

        def one(part: int) -> None:
            a, b = self.ranges[part]
            table = self.table[a:b].ctypes.data
            self.top_kernel(
                table, b - a, dim, q.ctypes.data, len(q), k, scores[part].ctypes.data, rows[part].ctypes.data
            )
            rows[part][rows[part] >= 0] += a  # range rows -> table rows

        self._map(one)
        return scores.transpose(1, 0, 2).reshape(len(q), -1), rows.transpose(1, 0, 2).reshape(len(q), -1)

    def _map(self, fn: Callable[[int], None]) -> None:
        if self._pool is None:
            fn(0)
        else:
            list(self._pool.map(fn, range(len(self.ranges))))

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
