"""Facts about Fibonacci numbers that a client needs as much as a server: the algorithm
names, F(0..93), digit estimates and decimal text. No numpy, no numba: ``fibrpc call``
and the client import this, never ``fibrpc.kernels``, so they start in milliseconds.
"""

from __future__ import annotations

from typing import Final

from fibrpc.errors import ErrorCode, RequestError

ALGORITHMS: tuple[str, ...] = ("naive", "iter", "fast")
"""The algorithm names a request may give, in the order of the module docstring."""

DEFAULT_ALGORITHM: Final = "fast"
"""The algorithm used when a request names none: the only one without a small bound."""

ITER_MAX_N: Final = 93
"""The largest n whose F(n) fits unsigned 64 bits: F(93) = 12200160415121876738."""

_SMALL_INT_BITS: Final = 3000
"""Below this many bits (about 900 digits) ``str(int)`` is as fast as GMP and always allowed."""

_LOG10_PHI_NUM: Final = 2089876402499787337692720892375554168225
_LOG10_PHI_DEN: Final = 10**40
"""log10 of the golden ratio, rounded *up* to 40 digits, so bounds built on it stay bounds."""


def _build_table() -> tuple[int, ...]:
    """Return F(0..ITER_MAX_N) by plain addition: 93 additions, cheap enough for import."""
    table = [0, 1]
    while len(table) <= ITER_MAX_N:
        table.append(table[-1] + table[-2])
    return tuple(table)


FAST_TABLE: tuple[int, ...] = _build_table()
"""F(0), ..., F(93): every Fibonacci number that fits 64 bits, for O(1) small answers."""

FAST_TABLE_TEXT: tuple[str, ...] = tuple(str(f) for f in FAST_TABLE)
"""The decimal texts of ``FAST_TABLE``: small replies are a tuple lookup, not a conversion."""


def magnitude(value: int) -> bytes:
    """The bytes of a non-negative int, little-endian, as few as hold it (b"" for 0):
    ``int.to_bytes(length, "little")``, the binary form of a result."""
    return value.to_bytes((value.bit_length() + 7) // 8, "little")


FAST_TABLE_BYTES: tuple[bytes, ...] = tuple(magnitude(f) for f in FAST_TABLE)
"""The magnitudes of ``FAST_TABLE``, little-endian (``b""`` for F(0)): binary replies."""


def fib_naive(n: int) -> int:
    """Return F(n) by the tutorial's doubly recursive definition: the oracle.

    Exponential time and recursion depth n, on purpose (see the module docstring). It
    checks nothing: the caller bounds n, and a negative n simply returns n.
    """
    return n if n < 2 else fib_naive(n - 1) + fib_naive(n - 2)


def decimal(x: int) -> str:
    """Return the decimal text of x, however large.

    ``str(int)`` refuses more than 4300 digits (Python 3.11+) and takes quadratic time;
    GMP's conversion is subquadratic and unlimited. Small ints still go through ``str``,
    which is as fast there and saves building an mpz.
    """
    if x.bit_length() <= _SMALL_INT_BITS:
        return str(x)
    import gmpy2  # noqa: PLC0415 - only for large ints: `fibrpc call` starts faster

    text: str = gmpy2.mpz(x).digits()
    return text


def estimate_digits(n: int) -> int:
    """Return an upper bound on the number of decimal digits of F(n), for n >= 0.

    It lets the protocol refuse a reply that would be too large before computing it.
    F(n) < phi**n, so F(n) has at most floor(n * log10(phi)) + 1 digits; the bound uses
    log10(phi) rounded up and integer arithmetic (exact for any n, unlike a float), and
    adds 1 for safety. It exceeds the true count by 1 or 2.
    """
    if n < 0:
        raise RequestError(
            ErrorCode.NEGATIVE, f"n={n} is negative; Fibonacci numbers start at n=0."
        )
    return n * _LOG10_PHI_NUM // _LOG10_PHI_DEN + 2


def estimate_bytes(n: int) -> int:
    """Return an upper bound on the bytes of F(n)'s magnitude (little-endian, as the
    binary reply forms carry it), for n >= 0.

    F(n) <= phi**(n - 1) for n >= 1, so it has at most n * log2(phi) + 1 bits; the bound
    uses log2(phi) rounded up (0.694242) in integer arithmetic and rounds up twice.
    """
    return n * 694_242 // 8_000_000 + 2
