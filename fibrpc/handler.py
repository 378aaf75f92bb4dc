"""Handling one request: a pure function from a body and its properties to a reply.

The worker's consume loop only moves messages; everything a request means is decided here,
so it is tested in milliseconds without a broker. Nothing a client sends raises out of
``Handler``: refusals become error replies, and a bug becomes an ``internal`` error reply
that is logged with its traceback.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Final

import numpy as np

from fibrpc import coalesce, kernels, memo, protocol
from fibrpc.config import DEFAULT_MEMO_BYTES, Limits
from fibrpc.errors import ErrorCode, RequestError

log = logging.getLogger(__name__)

#: Requests above these sizes are computed off the I/O thread so heartbeats keep flowing.
_HEAVY_NAIVE_N = 22
_HEAVY_FAST_N = 50_000


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A reply body, its content type, and the error code if it is a refusal."""

    body: bytes
    content_type: str
    error: str | None = None


class Handler:
    """Decodes, bounds-checks and computes requests for one worker process."""

    def __init__(
        self,
        limits: Limits | None = None,
        memo_bytes: int = DEFAULT_MEMO_BYTES,
        memo_dir: str | None = None,
    ):
        """``memo_dir``: the server's shared memo (``fibrpc.memo``), bounded by
        ``memo_bytes`` for the whole server; None: a memo of this process's own."""
        self.limits = limits or Limits()
        shared = memo.SharedMemo(memo_dir, memo_bytes) if memo_dir and memo_bytes else None
        self.fast = kernels.FastFib(memo_bytes=memo_bytes, memo=shared)

    def decode(
        self,
        body: bytes,
        content_type: str | None,
        algo_hint: str | None,
        accept: object = None,
    ) -> protocol.Request | Reply:
        """The request in ``body``, or the error reply that refuses it. ``accept``: the
        request's ``protocol.ACCEPT_HEADER`` header, naming the binary forms its client
        reads."""
        try:
            return protocol.decode_request(body, content_type, algo_hint, self.limits, accept)
        except RequestError as exc:
            return error_reply(exc)
        except Exception:
            log.exception("decoding a request of %d bytes failed", len(body))
            return error_reply(
                RequestError(ErrorCode.INTERNAL, "The server failed to decode this request.")
            )

    def is_heavy(self, request: protocol.Request) -> bool:
        """Whether computing ``request`` may take long enough to starve the I/O loop."""
        if not request.ns:
            return False
        top = max(request.ns)
        if request.algo == "naive":
            # A batch is as heavy as its total work: naive(n) makes about F(n + 1) calls,
            # and the lightest heavy request is naive(_HEAVY_NAIVE_N + 1).
            if top > _HEAVY_NAIVE_N:
                return True
            cost = sum(kernels.FAST_TABLE[n + 1] for n in request.ns)
            return cost >= kernels.FAST_TABLE[_HEAVY_NAIVE_N + 2]
        if request.algo == "fast":
            if top <= kernels.ITER_MAX_N:  # table lookups, as cheap as iter's
                return len(request.ns) > 100_000
            # The work of F(n) grows with n; the sum of the n not memoised is the batch's.
            if sum(request.ns) <= _HEAVY_FAST_N:
                return False
            return sum(n for n in request.ns if not self.fast.is_memoised(n)) > _HEAVY_FAST_N
        return len(request.ns) > 100_000

    def compute(self, request: protocol.Request) -> Reply:
        """The reply to a decoded request (in a binary form if its client reads one);
        never raises."""
        try:
            if request.reads:
                binary = self._binary(request)
                if binary is not None:
                    return Reply(*binary)
            texts = self._texts(request)
        except RequestError as exc:
            return error_reply(exc)
        except Exception:
            log.exception("computing %s for %d value(s) failed", request.algo, len(request.ns))
            return error_reply(
                RequestError(ErrorCode.INTERNAL, "The server failed to compute this request.")
            )
        if request.batch:
            return Reply(protocol.encode_results(texts), protocol.JSON)
        return Reply(protocol.encode_result(texts[0], request.form), request.form)

    def handle(
        self,
        body: bytes,
        content_type: str | None,
        algo_hint: str | None,
        accept: object = None,
    ) -> Reply:
        """Decode and compute in one step (what a worker does for a light request)."""
        request = self.decode(body, content_type, algo_hint, accept)
        if isinstance(request, Reply):
            return request
        return self.compute(request)

    def answer_calls(self, calls: list[coalesce.Incoming]) -> list[coalesce.Answer]:
        """The answers to accepted calls of a coalesced message, in their order: each
        algorithm's calls computed as one batch, and a call that fails alone (never
        expected: each was checked) answered with its own ``internal`` error. Never
        raises."""
        by_algo: dict[str, list[coalesce.Incoming]] = {}
        for call in calls:
            by_algo.setdefault(call.algo, []).append(call)
        texts: dict[int, str | RequestError] = {}
        for algo, group in by_algo.items():
            ns = [call.n for call in group]
            try:
                done: list[str | RequestError] = list(self._texts_of(algo, ns))
            except Exception:  # one at a time, to fail only the call that fails
                done = [self._text_alone(algo, n) for n in ns]
            for call, text in zip(group, done, strict=True):
                texts[call.index] = text
        answers = []
        for call in calls:
            text = texts[call.index]
            if isinstance(text, RequestError):
                answers.append(coalesce.Answer(call.id, error=text))
            else:
                answers.append(coalesce.Answer(call.id, text))
        return answers

    def _text_alone(self, algo: str, n: int) -> str | RequestError:
        try:
            return self._texts_of(algo, [n])[0]
        except RequestError as exc:
            return exc
        except Exception:
            log.exception("computing %s(%d) of a coalesced message failed", algo, n)
            return RequestError(ErrorCode.INTERNAL, "The server failed to compute this call.")

    def _binary(self, request: protocol.Request) -> tuple[bytes, str] | None:
        """The results as the binary form the client reads (``protocol.encode_values``):
        no decimal text is made. None if it reads none this server writes."""
        ns, reads = request.ns, request.reads
        if request.packed is not None and protocol.U64 in reads and request.algo != "naive":
            # A binary batch answered in binary: the table indexed by the request's own
            # bytes, in one step (fast and iter agree on every n of the table).
            at = np.frombuffer(request.packed, dtype=np.uint64)
            if not at.size or at.max() <= kernels.ITER_MAX_N:
                return _FAST_TABLE_LE.take(at).tobytes(), protocol.U64
        if request.algo == "iter":
            values = kernels.iter_array(ns)
            if protocol.U64 in reads:
                return values.astype("<u8", copy=False).tobytes(), protocol.U64
            return protocol.encode_values(values.tolist(), reads)
        if request.algo == "fast":
            if protocol.U64 in reads:
                try:  # every n of a decoded request is 0 or more: no index from the end
                    return b"".join(map(FAST_TABLE_U64.__getitem__, ns)), protocol.U64
                except IndexError:
                    pass  # an n past the table: magnitudes, 8 bytes each if they fit
            return protocol.encode_magnitudes(self.fast.magnitudes(ns), reads)
        return protocol.encode_values(kernels.naive_values(ns), reads)

    def _texts(self, request: protocol.Request) -> list[str]:
        return self._texts_of(request.algo, request.ns)

    def _texts_of(self, algo: str, ns: list[int]) -> list[str]:
        if algo == "fast":
            return self.fast.texts(ns)
        if algo == "iter":
            return kernels.iter_texts(ns)
        return kernels.naive_texts(ns)


#: F(0)..F(93) as ``protocol.U64`` items: a batch of small n is one join of lookups.
FAST_TABLE_U64: Final = tuple(f.to_bytes(8, "little") for f in kernels.FAST_TABLE)
#: The same as a little-endian array: a binary batch indexes it with its own bytes.
_FAST_TABLE_LE: Final = np.array(kernels.FAST_TABLE, dtype="<u8")


def error_reply(error: RequestError) -> Reply:
    """The JSON error envelope replying to a refused request."""
    return Reply(protocol.encode_error(error), protocol.JSON, error.code)
