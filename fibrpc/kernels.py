"""The Fibonacci algorithms a request can name, and why there are three of them.

A request chooses an algorithm with its ``algo`` field; each one exists for a reason:

``naive``
    The tutorial's recursion, ``F(n) = F(n-1) + F(n-2)``, in plain Python. It takes
    exponential time and is here on purpose: it is the obviously correct oracle the other
    algorithms are tested against, and a way to give a server deliberately slow work (to
    exercise prefetch, heartbeats and timeouts). Callers must bound its n (about 30 is
    already hundreds of milliseconds).

``iter``
    The loop ``a, b = b, a + b`` compiled by numba in unsigned 64-bit arithmetic, with one
    call for a whole batch (``_iter_many``) so a batch costs one trip into machine code.
    It is exact only while F(n) fits 64 bits, so it refuses ``n > ITER_MAX_N`` (93) with
    ``ErrorCode.OUT_OF_RANGE`` instead of wrapping around silently. The kernels are
    compiled with ``cache=True``: numba stores machine code in ``__pycache__`` next to
    this file (or under ``NUMBA_CACHE_DIR`` when that is set), so only the first process
    ever compiles and every worker after it starts in milliseconds; ``warm()`` lets a
    server pay that cost before it starts consuming.

``fast`` (the default)
    GMP's Fibonacci (``gmpy2.fib``), which takes O(M(n) log n) time, with M the cost of a
    multiplication; it is the only algorithm for large n. Most of the cost of a large
    answer is not the number but its decimal text, so ``FastFib`` keeps an LRU memo of
    its results (as text, or as the magnitude's bytes), bounded in bytes (a memo bounded
    in entries could hold gigabytes): in a server, one memo its workers share
    (``fibrpc.memo``). ``F(0..93)`` come from tables built at import.

Decimal text is always produced by GMP (``decimal``), never by ``str(int)``: since Python
3.11, ``str`` refuses integers past 4300 digits, and it is quadratic in the digit count.

Nothing here checks a configured upper bound on n or on the size of a reply; the protocol
does that before calling a kernel, using ``estimate_digits`` to refuse a reply that would
be too large before computing it. This module imports no pika.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

import gmpy2
import numpy as np
import numpy.typing as npt

from fibrpc.errors import ErrorCode, RequestError
from fibrpc.memo import LocalMemo, Memo
from fibrpc.numbers import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    FAST_TABLE,
    FAST_TABLE_BYTES,
    FAST_TABLE_TEXT,
    ITER_MAX_N,
    decimal,
    estimate_digits,
    fib_naive,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "FAST_TABLE",
    "FAST_TABLE_TEXT",
    "ITER_MAX_N",
    "FastFib",
    "decimal",
    "estimate_digits",
    "fib_iter",
    "fib_iter_many",
    "fib_naive",
    "iter_array",
    "iter_texts",
    "naive_texts",
    "naive_values",
    "warm",
]

# The kernels only ever see int64 inputs (the wrappers convert) and use np.uint64
# constants throughout: numba types a mix of uint64 and int64 as float64, which would
# silently lose precision above 2**53.


def _iter_one(n: int) -> np.uint64:
    """Return F(n) for 0 <= n <= 93 in uint64; the caller has checked n."""
    if n == 0:
        return np.uint64(0)
    a = np.uint64(0)
    b = np.uint64(1)
    # n - 1 steps leave F(n) in b and never form F(n + 1), which overflows for n = 93.
    for _ in range(n - 1):
        a, b = b, a + b
    return b


def _iter_many(ns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """Return F(n) for every n of ``ns`` (each 0 <= n <= 93, checked by the caller).

    The loop runs once, up to the largest n, into a table; every member is then an
    index. A batch of any length costs at most 93 additions plus one lookup per member.
    """
    out = np.empty(ns.size, dtype=np.uint64)
    if ns.size == 0:
        return out
    top = ns.max()
    table = np.empty(top + 1, dtype=np.uint64)
    table[0] = np.uint64(0)
    if top >= 1:
        table[1] = np.uint64(1)
    for k in range(2, top + 1):
        table[k] = table[k - 1] + table[k - 2]
    for i in range(ns.size):
        out[i] = table[ns[i]]
    return out


class _Compiled(NamedTuple):
    one: Callable[[int], np.uint64]
    many: Callable[[npt.NDArray[np.int64]], npt.NDArray[np.uint64]]


_compiled: _Compiled | None = None
_compile_lock = threading.Lock()


def compiled() -> _Compiled:
    """The numba-compiled ``iter`` kernels, compiled (or loaded from cache) on first use.

    numba is imported here, not at module import: it costs about 0.3 s, which the
    ``fibrpc call`` command and the client (which import the protocol, and so this
    module) should not pay. ``nogil`` lets a long batch run beside the I/O thread.
    """
    global _compiled
    if _compiled is None:
        with _compile_lock:
            if _compiled is None:
                import numba  # noqa: PLC0415 - deliberately lazy, see above

                jit = numba.njit(nogil=True, cache=True)
                _compiled = _Compiled(jit(_iter_one), jit(_iter_many))
    return _compiled


def _iter_refusal(n: int, where: str = "") -> RequestError:
    """Build the error for an n that ``iter`` cannot answer exactly."""
    if n < 0:
        return RequestError(
            ErrorCode.NEGATIVE, f"n={n}{where} is negative; Fibonacci numbers start at n=0."
        )
    return RequestError(
        ErrorCode.OUT_OF_RANGE,
        f"n={n}{where} is above {ITER_MAX_N}, the largest n whose F(n) fits the 64 bits"
        f" of algo 'iter'; use algo 'fast' for larger n.",
    )


def fib_iter(n: int) -> int:
    """Return F(n) computed by the numba ``iter`` kernel, as a Python int.

    Raises ``RequestError`` (``NEGATIVE`` or ``OUT_OF_RANGE``) unless 0 <= n <= 93, so it
    never returns a number that wrapped around 2**64; ``TypeError`` for a non-integer n.
    """
    n = operator.index(n)
    if not 0 <= n <= ITER_MAX_N:
        raise _iter_refusal(n)
    return int(compiled().one(n))


def fib_iter_many(ns: Sequence[int] | npt.NDArray[np.integer]) -> list[int]:
    """Return [F(n) for n in ns] with one call into the numba kernel.

    Every member is checked first; the error names the first bad member and its index.
    Raises ``RequestError`` (``NEGATIVE`` or ``OUT_OF_RANGE``) like ``fib_iter``, and
    ``TypeError`` for members that are not integers.
    """
    result: list[int] = compiled().many(_checked_int64(ns)).tolist()
    return result


def _checked_int64(ns: Sequence[int] | npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
    """Return ns as a contiguous int64 array after checking 0 <= n <= 93 for every member.

    The check is vectorised: numpy converts a list of ints in one C loop, where a Python
    loop over a batch of 1000 would cost more than the kernel itself. Anything numpy
    cannot hold as integers (floats, ints past 64 bits, which numpy turns into floats or
    objects) takes the slow path, which finds and names the offending member.
    """
    arr = np.asarray(ns) if len(ns) else np.empty(0, dtype=np.int64)
    if arr.ndim != 1:
        raise TypeError(f"expected a flat batch of integers, got a {arr.ndim}-d array.")
    if arr.dtype.kind not in "iu":
        for i, n in enumerate(ns):
            if not 0 <= operator.index(n) <= ITER_MAX_N:
                raise _iter_refusal(int(n), f" (member {i} of the batch)")
        return np.array([operator.index(n) for n in ns], dtype=np.int64)
    bad = np.flatnonzero((arr < 0) | (arr > ITER_MAX_N))
    if bad.size:
        first = int(bad[0])
        raise _iter_refusal(int(arr[first]), f" (member {first} of the batch)")
    return np.ascontiguousarray(arr, dtype=np.int64)


def iter_array(ns: list[int]) -> npt.NDArray[np.uint64]:
    """F(n) for a batch by the ``iter`` algorithm, as a ``uint64`` array (a binary reply
    is its bytes). Raises what ``fib_iter_many`` raises."""
    values: npt.NDArray[np.uint64] = compiled().many(_checked_int64(ns))
    return values


def iter_texts(ns: list[int]) -> list[str]:
    """Return the decimal texts of F(n) for a batch by the ``iter`` algorithm.

    Raises what ``fib_iter_many`` raises. The numbers are below 2**64, so ``str`` is safe.
    """
    return [str(f) for f in fib_iter_many(ns)]


def naive_texts(ns: list[int]) -> list[str]:
    """Return the decimal texts of F(n) for a batch by the ``naive`` algorithm.

    The caller bounds n; a negative n is refused here with ``ErrorCode.NEGATIVE``.
    """
    return [str(f) for f in naive_values(ns)]


def naive_values(ns: list[int]) -> list[int]:
    """F(n) for a batch by the ``naive`` algorithm; raises as ``naive_texts``."""
    for i, n in enumerate(ns):
        if n < 0:
            raise RequestError(
                ErrorCode.NEGATIVE,
                f"n={n} (member {i} of the batch) is negative; Fibonacci numbers start at n=0.",
            )
    return [fib_naive(n) for n in ns]


class FastFib:
    """The ``fast`` algorithm: GMP's Fibonacci with a memo of its large results.

    Converting a large F(n) to decimal costs more than computing it, and a load of
    repeated large requests (a benchmark, a retry storm) should not pay it twice. The memo
    holds results for n > ``memo_min_n`` only (smaller ones are cheap to recompute), in
    either form a request asks for: decimal text (``text``, ``texts``) or the magnitude's
    bytes (``magnitudes``), each stored once computed. It is bounded in bytes,
    ``memo_bytes``, because the size of an entry ranges over orders of magnitude; a
    result larger than the whole bound is not stored.

    ``memo`` is where the entries live: a server's ``fibrpc.memo.SharedMemo``, which all
    its workers share, or by default a ``LocalMemo`` of this process bounded by
    ``memo_bytes``. Safe to share between threads; computation happens outside any lock.

    ``hits`` counts memo-eligible lookups answered from the memo (by this object, whoever
    computed the entry), ``misses`` those that had to be computed.
    """

    def __init__(
        self,
        memo_bytes: int = 64 * 2**20,
        memo_min_n: int = 10_000,
        memo: Memo | None = None,
    ) -> None:
        if memo_bytes < 0:
            raise ValueError(f"memo_bytes={memo_bytes} is negative; use 0 to disable the memo.")
        self.memo_min_n = memo_min_n
        self.memo: Memo = memo if memo is not None else LocalMemo(memo_bytes)
        self.memo_bytes = self.memo.bound
        self.hits = 0
        self.misses = 0
        self._count_lock = threading.Lock()  # the I/O thread and the compute thread count

    @property
    def memo_bytes_used(self) -> int:
        """Bytes of the results in the memo; never above ``memo_bytes``."""
        return self.memo.used()

    @property
    def memo_entries(self) -> int:
        """Number of results in the memo (a text and a magnitude of one n count two)."""
        return self.memo.entries()

    def is_memoised(self, n: int) -> bool:
        """Whether F(n) would be answered without computing it: table or memo (in either
        form).

        It lets a server answer cheap requests inline and hand only real work to a
        thread. It neither counts as a hit nor refreshes n's place in the LRU order.
        """
        if 0 <= n <= ITER_MAX_N:
            return True
        if n <= self.memo_min_n:
            return False
        return self.memo.contains(_TEXT + str(n)) or self.memo.contains(_MAGNITUDE + str(n))

    def text(self, n: int) -> str:
        """Return the decimal text of F(n).

        The configured upper bound on n is the caller's to check. Raises ``RequestError``
        with ``ErrorCode.NEGATIVE`` for n < 0.
        """
        if n <= ITER_MAX_N:
            if n < 0:
                raise _negative(n)
            return FAST_TABLE_TEXT[n]
        if n <= self.memo_min_n:
            small: str = gmpy2.fib(n).digits()
            return small
        key = _TEXT + str(n)
        cached = self._lookup(key)
        if cached is not None:
            return cached.decode("ascii")
        text: str = gmpy2.fib(n).digits()
        self.memo.put(key, text.encode("ascii"))
        return text

    def texts(self, ns: list[int]) -> list[str]:
        """Return the decimal texts of F(n) for a batch; raises like ``text``.

        A batch of small n (all within the 64-bit table) is a list of tuple lookups.
        """
        if not ns:
            return []
        if min(ns) >= 0 and max(ns) <= ITER_MAX_N:
            return [FAST_TABLE_TEXT[n] for n in ns]
        return [self.text(n) for n in ns]

    def magnitude(self, n: int) -> bytes:
        """Return F(n)'s magnitude as little-endian bytes, as few as hold it (``b""`` for
        F(0)): ``int.to_bytes(length, "little")``. Raises like ``text``."""
        if n <= ITER_MAX_N:
            if n < 0:
                raise _negative(n)
            return FAST_TABLE_BYTES[n]
        if n <= self.memo_min_n:
            return _gmp_magnitude(n)
        key = _MAGNITUDE + str(n)
        cached = self._lookup(key)
        if cached is not None:
            return cached
        value = _gmp_magnitude(n)
        self.memo.put(key, value)
        return value

    def magnitudes(self, ns: list[int]) -> list[bytes]:
        """Return the magnitudes of F(n) for a batch (see ``magnitude``); raises like
        ``text``."""
        if not ns:
            return []
        if min(ns) >= 0 and max(ns) <= ITER_MAX_N:
            return [FAST_TABLE_BYTES[n] for n in ns]
        return [self.magnitude(n) for n in ns]

    def value(self, n: int) -> int:
        """Return F(n) as a Python int, for tests and client-side checks; no memo."""
        if n < 0:
            raise _negative(n)
        return int(gmpy2.fib(n))

    def _lookup(self, key: str) -> bytes | None:
        cached = self.memo.get(key)
        with self._count_lock:
            if cached is None:
                self.misses += 1
            else:
                self.hits += 1
        return cached


#: Memo keys: the form, then n.
_TEXT: Final = "t"
_MAGNITUDE: Final = "m"


def _gmp_magnitude(n: int) -> bytes:
    """F(n)'s magnitude straight from GMP (no Python int: half the time at n = 10^7)."""
    value = gmpy2.fib(n)
    result: bytes = value.to_bytes((value.bit_length() + 7) // 8, "little")
    return result


def _negative(n: int) -> RequestError:
    return RequestError(ErrorCode.NEGATIVE, f"n={n} is negative; Fibonacci numbers start at n=0.")


def warm() -> None:
    """Load (or, the first time, compile) every numba kernel, and touch GMP.

    A server calls it before consuming, so that its first request does not wait for a
    compilation; with numba's on-disk cache it costs milliseconds after the first run.
    """
    kernel = compiled()
    kernel.one(ITER_MAX_N)
    kernel.many(np.arange(ITER_MAX_N + 1, dtype=np.int64))
    gmpy2.fib(ITER_MAX_N + 1)
