"""The Fibonacci kernels alone, in one process: what a worker pays per value of n.

Read with ../shared/baselines/kernels_baseline.py's figures beside: ``fast`` for small n
should cost a tuple lookup, for large n about GMP's time plus its decimal conversion
(cold) or a dict lookup (warm, from the memo).
"""

from __future__ import annotations

import gmpy2
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from fibrpc import kernels
from fibrpc.kernels import FastFib

BATCH = [n % 91 for n in range(1000)]  # 1000 values of n in 0..90


@pytest.mark.parametrize("n", [20, 25])
def test_naive(benchmark: BenchmarkFixture, n: int) -> None:
    assert benchmark(kernels.fib_naive, n) == kernels.FAST_TABLE[n]


def test_iter_one_n90(benchmark: BenchmarkFixture) -> None:
    kernels.warm()
    assert benchmark(kernels.fib_iter, 90) == kernels.FAST_TABLE[90]


def test_iter_batch_of_1000(benchmark: BenchmarkFixture) -> None:
    kernels.warm()
    result = benchmark(kernels.fib_iter_many, BATCH)
    assert result[90] == kernels.FAST_TABLE[90]


def test_iter_texts_batch_of_1000(benchmark: BenchmarkFixture) -> None:
    """What the worker really calls for an iter batch: the kernel plus ``str`` of each."""
    kernels.warm()
    result = benchmark(kernels.iter_texts, BATCH)
    assert result[90] == kernels.FAST_TABLE_TEXT[90]


def test_fast_texts_batch_of_1000(benchmark: BenchmarkFixture) -> None:
    result = benchmark(FastFib().texts, BATCH)
    assert result[90] == kernels.FAST_TABLE_TEXT[90]


@pytest.mark.parametrize("n", [90, 10**4, 10**5, 10**6])
def test_fast_cold(benchmark: BenchmarkFixture, n: int) -> None:
    """No memo: every call computes F(n) with GMP and converts it to decimal."""
    fast = FastFib(memo_bytes=0)
    text = benchmark(fast.text, n)
    assert len(text) == len(gmpy2.fib(n).digits())


@pytest.mark.parametrize("n", [10**5, 10**6])
def test_fast_warm(benchmark: BenchmarkFixture, n: int) -> None:
    """A memo hit: the text of a recent large F(n) is looked up, not recomputed."""
    fast = FastFib()
    fast.text(n)
    text = benchmark(fast.text, n)
    assert fast.hits > 0
    assert len(text) == len(gmpy2.fib(n).digits())


def test_reference_gmpy2_fib_and_digits_n1e6(benchmark: BenchmarkFixture) -> None:
    """The floor under ``fast`` cold at 10^6: GMP itself, no fibrpc code at all."""
    text = benchmark(lambda: gmpy2.fib(10**6).digits())
    assert len(text) == 208_988
