"""The Fibonacci kernels, checked against each other and against independent arithmetic.

No broker: everything here runs in a few seconds. Big results are compared as numbers
parsed by GMP (``gmpy2.mpz(text)``), never through ``str(int)``, which Python refuses past
4300 digits.
"""

from __future__ import annotations

import gmpy2
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibrpc import kernels, numbers
from fibrpc.errors import ErrorCode, RequestError
from fibrpc.kernels import (
    FAST_TABLE,
    FAST_TABLE_TEXT,
    ITER_MAX_N,
    FastFib,
    decimal,
    estimate_digits,
    fib_iter,
    fib_iter_many,
    fib_naive,
    iter_texts,
    naive_texts,
)

F_93 = 12200160415121876738
F_MILLION_DIGITS = 208_988
F_MILLION_HEAD = "1953282128707757731632"


def doubling(n: int) -> tuple[int, int]:
    """(F(n), F(n+1)) by fast doubling in pure Python, independent of GMP's fib."""
    a, b = 0, 1  # F(k), F(k+1) for k = the bits of n read so far
    for bit in bin(n)[2:]:
        c = a * (2 * b - a)  # F(2k)
        d = a * a + b * b  # F(2k+1)
        a, b = (d, c + d) if bit == "1" else (c, d)
    return a, b


def doubling_mod(n: int, m: int) -> int:
    """F(n) mod m by fast doubling: the last digits of F(n) without computing F(n)."""
    a, b = 0, 1
    for bit in bin(n)[2:]:
        c = a * (2 * b - a) % m
        d = (a * a + b * b) % m
        a, b = (d, (c + d) % m) if bit == "1" else (c, d)
    return a


# --- the algorithms agree -------------------------------------------------------------


def test_every_algorithm_agrees_with_the_naive_oracle_up_to_30():
    fast = FastFib()
    ns = list(range(31))
    expected = [fib_naive(n) for n in ns]
    assert [fib_iter(n) for n in ns] == expected
    assert fib_iter_many(ns) == expected
    assert [fast.value(n) for n in ns] == expected
    assert [int(gmpy2.fib(n)) for n in ns] == expected
    assert iter_texts(ns) == fast.texts(ns) == [str(f) for f in expected]
    assert naive_texts(ns[:25]) == [str(f) for f in expected[:25]]  # the batch wrapper, cheaply


def test_iter_and_fast_agree_on_the_whole_64_bit_range():
    fast = FastFib()
    for n in range(ITER_MAX_N + 1):
        assert fib_iter(n) == fast.value(n) == FAST_TABLE[n]
        assert fast.text(n) == FAST_TABLE_TEXT[n] == str(fib_iter(n))
    assert fib_iter(ITER_MAX_N) == F_93


def test_iter_many_on_the_whole_range_in_one_call_equals_one_call_per_n():
    ns = list(range(ITER_MAX_N + 1))
    assert fib_iter_many(ns) == [fib_iter(n) for n in ns] == list(FAST_TABLE)
    assert fib_iter_many(np.array(ns[::-1], dtype=np.int64)) == list(FAST_TABLE[::-1])
    assert fib_iter_many(np.array(ns, dtype=np.uint8)[::3]) == list(FAST_TABLE[::3])


def test_iter_many_of_an_empty_batch_is_empty():
    assert fib_iter_many([]) == []
    assert fib_iter_many(np.empty(0, dtype=np.int64)) == []


def test_numba_kernels_stay_in_uint64_arithmetic():
    kernels.warm()
    for kernel in kernels.compiled():
        for signature in kernel.nopython_signatures:
            assert "uint64" in str(signature.return_type)
            assert "float" not in str(signature)
    assert kernels.compiled().one.nopython_signatures[0].return_type == numba.uint64


def test_the_fast_table_holds_exactly_the_64_bit_fibonacci_numbers():
    assert len(FAST_TABLE) == len(FAST_TABLE_TEXT) == ITER_MAX_N + 1
    assert FAST_TABLE[-1] < 2**64 <= FAST_TABLE[-1] + FAST_TABLE[-2]


# --- fast, against independent arithmetic ---------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=ITER_MAX_N + 1, max_value=200_000))
def test_fast_text_equals_an_independent_fast_doubling(n):
    fast = FastFib(memo_min_n=1_000)
    assert gmpy2.mpz(fast.text(n)) == doubling(n)[0]


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=100_000))
def test_fast_values_satisfy_the_doubling_identities(n):
    fast = FastFib()
    f_n, f_n1 = fast.value(n), fast.value(n + 1)
    assert fast.value(2 * n) == f_n * (2 * f_n1 - f_n)
    assert fast.value(2 * n + 1) == f_n * f_n + f_n1 * f_n1


def test_f_of_a_million_has_208988_digits_and_its_known_first_and_last_digits():
    text = FastFib().text(10**6)
    assert len(text) == F_MILLION_DIGITS
    assert text.startswith(F_MILLION_HEAD)
    assert int(text[-30:]) == doubling_mod(10**6, 10**30)


def test_the_first_digits_of_f_of_a_million_follow_from_binets_formula():
    # log10 F(n) = n log10(phi) - log10(sqrt 5) (the psi**n term is far below precision);
    # its fractional part gives the leading digits, its integer part the digit count.
    with gmpy2.context(precision=300):
        sqrt5 = gmpy2.sqrt(gmpy2.mpfr(5))
        log_f = 10**6 * gmpy2.log10((1 + sqrt5) / 2) - gmpy2.log10(sqrt5)
        whole = gmpy2.floor(log_f)
        head = gmpy2.floor(gmpy2.exp10(log_f - whole + len(F_MILLION_HEAD) - 1))
    assert int(whole) + 1 == F_MILLION_DIGITS
    assert gmpy2.mpz(head).digits() == F_MILLION_HEAD


# --- refusals --------------------------------------------------------------------------


def test_iter_refuses_94_and_suggests_fast():
    with pytest.raises(RequestError) as caught:
        fib_iter(94)
    assert caught.value.code == ErrorCode.OUT_OF_RANGE
    assert "94" in caught.value.message
    assert "93" in caught.value.message
    assert "'fast'" in caught.value.message


def test_iter_refuses_minus_one_as_negative():
    with pytest.raises(RequestError) as caught:
        fib_iter(-1)
    assert caught.value.code == ErrorCode.NEGATIVE
    assert "-1" in caught.value.message


@pytest.mark.parametrize("n", [94, 2**63, 10**30])
def test_iter_never_returns_an_overflowed_number(n):
    with pytest.raises(RequestError) as caught:
        fib_iter(n)
    assert caught.value.code == ErrorCode.OUT_OF_RANGE


@pytest.mark.parametrize(
    ("ns", "code", "bad"),
    [
        ([1, 2, 94, 95], ErrorCode.OUT_OF_RANGE, "n=94 (member 2 "),
        ([5, -1, 94], ErrorCode.NEGATIVE, "n=-1 (member 1 "),
        ([0, 2**63], ErrorCode.OUT_OF_RANGE, f"n={2**63} (member 1 "),
        ([0, 1, 10**30], ErrorCode.OUT_OF_RANGE, f"n={10**30} (member 2 "),
        (np.array([3, 93, 1000]), ErrorCode.OUT_OF_RANGE, "n=1000 (member 2 "),
    ],
)
def test_iter_many_names_the_first_bad_member_and_its_index(ns, code, bad):
    with pytest.raises(RequestError) as caught:
        fib_iter_many(ns)
    assert caught.value.code == code
    assert bad in caught.value.message


def test_iter_refuses_members_that_are_not_integers():
    with pytest.raises(TypeError):
        fib_iter_many([1, 2.5])
    with pytest.raises(TypeError):
        fib_iter(3.0)  # type: ignore[arg-type]


def test_fast_refuses_negative_n():
    fast = FastFib()
    for call in (fast.text, fast.value, lambda n: fast.texts([1, n])):
        with pytest.raises(RequestError) as caught:
            call(-5)
        assert caught.value.code == ErrorCode.NEGATIVE


def test_a_negative_n_in_a_small_batch_is_refused_not_read_from_the_end_of_the_table():
    with pytest.raises(RequestError) as caught:
        FastFib().texts([3, -1])
    assert caught.value.code == ErrorCode.NEGATIVE


def test_naive_refuses_negative_n():
    with pytest.raises(RequestError) as caught:
        naive_texts([2, -3])
    assert caught.value.code == ErrorCode.NEGATIVE


# --- the memo ---------------------------------------------------------------------------


def test_the_memo_stays_within_its_byte_bound_and_evicts_the_oldest():
    bound = 20_000  # about nine texts of F(10_000..) at 2090 digits each
    fast = FastFib(memo_bytes=bound, memo_min_n=1_000)
    ns = list(range(10_000, 10_030))
    for n in ns:
        fast.text(n)
        assert fast.memo_bytes_used <= bound
    assert fast.misses == len(ns)
    assert 0 < fast.memo_entries < len(ns)
    assert fast.memo_bytes_used == sum(len(fast.text(n)) for n in ns[-fast.memo_entries :])
    assert fast.is_memoised(ns[-1])
    assert not fast.is_memoised(ns[0])
    misses = fast.misses
    fast.text(ns[0])
    assert fast.misses == misses + 1


def test_a_repeated_large_n_is_a_memo_hit():
    fast = FastFib(memo_min_n=1_000)
    first = fast.text(50_000)
    assert (fast.hits, fast.misses) == (0, 1)
    assert fast.text(50_000) == first
    assert fast.texts([50_000, 50_000]) == [first, first]
    assert (fast.hits, fast.misses) == (3, 1)
    assert fast.memo_entries == 1
    assert fast.memo_bytes_used == len(first)


def test_magnitudes_are_little_endian_bytes_as_few_as_hold_them():
    fast = FastFib(memo_min_n=1_000)
    ns = [0, 1, 2, 93, 94, 500, 1_000, 50_000]
    for n, magnitude in zip(ns, fast.magnitudes(ns), strict=True):
        value = int(gmpy2.fib(n))
        assert magnitude == value.to_bytes((value.bit_length() + 7) // 8, "little"), n
    assert fast.magnitude(0) == b""
    assert fast.magnitude(1) == b"\x01"
    assert fast.magnitude(93) == F_93.to_bytes(8, "little")
    assert fast.magnitudes([]) == []
    with pytest.raises(RequestError) as caught:
        fast.magnitudes([3, -1])
    assert caught.value.code == ErrorCode.NEGATIVE


def test_each_form_is_memoised_once_computed_and_counted_apart():
    fast = FastFib(memo_min_n=1_000)
    magnitude = fast.magnitude(50_000)
    assert (fast.hits, fast.misses) == (0, 1)
    assert fast.is_memoised(50_000)  # in one form: cheap to answer in that form
    assert fast.magnitudes([50_000]) == [magnitude]
    assert (fast.hits, fast.misses) == (1, 1)
    text = fast.text(50_000)  # the other form: computed, then memoised too
    assert (fast.hits, fast.misses) == (1, 2)
    assert fast.memo_entries == 2
    assert fast.memo_bytes_used == len(magnitude) + len(text)
    assert int.from_bytes(magnitude, "little") == int(gmpy2.mpz(text))


def test_a_hit_refreshes_an_entry_so_the_least_recently_used_goes_first():
    size = len(FastFib().text(10_000))
    fast = FastFib(memo_bytes=2 * size + 10, memo_min_n=1_000)
    fast.text(10_000)
    fast.text(10_001)
    fast.text(10_000)  # now 10_001 is the least recently used
    fast.text(10_002)
    assert fast.is_memoised(10_000)
    assert not fast.is_memoised(10_001)
    assert fast.is_memoised(10_002)


def test_a_result_larger_than_the_whole_memo_is_not_stored():
    fast = FastFib(memo_bytes=1_000, memo_min_n=1_000)
    text = fast.text(10_000)
    assert len(text) > 1_000
    assert fast.memo_entries == 0
    assert fast.memo_bytes_used == 0


def test_small_n_are_recomputed_rather_than_memoised():
    fast = FastFib(memo_min_n=10_000)
    fast.text(5_000)
    fast.text(5_000)
    assert fast.memo_entries == 0
    assert (fast.hits, fast.misses) == (0, 0)
    assert fast.is_memoised(93)
    assert not fast.is_memoised(5_000)


# --- decimal text and digit estimates ---------------------------------------------------


def test_decimal_converts_ints_far_past_pythons_4300_digit_limit():
    x = 7**20_000 + 12_345  # 16,902 digits
    text = decimal(x)
    assert len(text) == 16_902
    assert text == gmpy2.mpz(x).digits()
    assert text.endswith(str(7**20_000 % 10**20 + 12_345)[-20:])
    assert int(gmpy2.mpz(text)) == x
    assert decimal(-x) == "-" + text


def test_decimal_of_small_numbers_is_plain_str():
    assert decimal(0) == "0"
    assert decimal(-7) == "-7"
    assert decimal(F_93) == "12200160415121876738"


def test_the_digit_estimate_bounds_the_true_count_tightly():
    fast = FastFib(memo_bytes=0)
    for n in [*range(200), *range(1_000, 200_001, 997), 10**6]:
        actual = len(fast.text(n))
        assert actual <= estimate_digits(n) <= actual + 2, n


def test_the_digit_estimate_uses_log10_phi_rounded_up():
    with gmpy2.context(precision=300):
        exact = gmpy2.log10((1 + gmpy2.sqrt(gmpy2.mpfr(5))) / 2)
        rounded = gmpy2.mpfr(numbers._LOG10_PHI_NUM) / numbers._LOG10_PHI_DEN
        assert exact < rounded < exact + gmpy2.mpfr(10) ** -39


def test_warm_can_run_more_than_once():
    kernels.warm()
    kernels.warm()
    assert fib_iter(10) == 55
