"""Fuzzing a live server: thousands of generated messages to a real ``fibrpc serve``.

Hypothesis generates lists of AMQP messages (random bytes, near-miss numbers, JSON of every
shape, bodies around ``--max-body-bytes``, odd content types, ``type``s, headers,
``reply_to``s and correlation ids) and one test publishes them all to a two-worker
server. Afterwards: every message with a usable ``reply_to`` got exactly one well-formed
reply carrying its correlation id, and every answer is right; the queue is empty; no worker
died or lost its connection; and a correct call is still answered correctly.

Only what pika can encode is generated (no floats in headers, short strings of at most
255 bytes). A ``reply_to`` that names no queue cannot be observed, so only messages with
RabbitMQ's direct reply-to are counted; the others are sent all the same, to check that
they cost nothing. The nasty examples (those the issue lists, and those the fuzzing found)
are pinned below as regular tests, each with the exact code of its reply.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import json
import struct
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import gmpy2
import pika
import pytest
from conftest import URL, broker_connection, start_server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rawclient import DIRECT, RawClient

from fibrpc import Client, amqp
from fibrpc.config import DEFAULT_MAX_DELIVERIES
from fibrpc.errors import ErrorCode
from fibrpc.kernels import ALGORITHMS
from fibrpc.protocol import DEADLINE_HEADER, DELIVERIES_HEADER

MAX_BODY = 8192
#: Small bounds, so that whatever the fuzzer sends, an accepted request is quick to answer.
SERVER_ARGS = (
    "--max-body-bytes",
    str(MAX_BODY),
    "--naive-max-n",
    "20",
    "--fast-max-n",
    "20000",
    "--max-batch",
    "64",
    "--max-reply-bytes",
    "100000",
)
ERROR_CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}
JSON = "application/json"
TEXT = "text/plain"
QUORUM_DELIVERIES = "x-delivery-count"
NOW_MS = int(time.time() * 1000)
SELF = "<the request queue>"  # a reply_to naming the request queue itself
NOT_UTF8 = b"\xff\xfe\x80"

# -- message strategies --------------------------------------------------------------------

utf8_text = st.text(st.characters(codec="utf-8"), max_size=20)

NEAR_MISSES = [
    b" 30",
    b"30 ",
    b"30\n",
    b"\t30",
    b"3e1",
    b"3E1",
    b"30.0",
    b"30.",
    b".5",
    b"0x1e",
    b"0o36",
    b"0b11110",
    b"30_000",
    b"1,000",
    "١٢".encode(),  # Arabic-Indic digits
    "\uff13\uff10".encode(),  # full-width digits
    "\u00b3".encode(),  # superscript three: str.isdigit() says yes
    b"-0",
    b"+30",
    b"+0",
    b"-30",
    b"--30",
    b"030",
    b"0" * 50 + b"30",
    b"9" * 20,
    b"18446744073709551616",  # 2**64
    b"9" * 5000,
    b"1" + b"0" * 4999,
    b"-" + b"9" * 5000,
    b"NaN",
    b"inf",
    b"-inf",
    b"Infinity",
    b"1e400",
    b"\x00",
    b"30\x00",
    b"\xef\xbb\xbf30",  # a UTF-8 byte-order mark
    b"",
    b"true",
    b"null",
    b'"30"',
    b"[30]",
    b"{}",
    b"[]",
    b"{",
    b'{"n": 30}',
    b'{"n": 30,}',
    b'{"n": 030}',
    b'{"n": NaN}',
    b'{"n": Infinity}',
    b'{"n": -0}',
    b'{"n": 1e400}',
    b'{"n": 30, "n": "x"}',
    b'{"n": ' + b"9" * 5000 + b"}",
    b'{"n": -' + b"9" * 5000 + b"}",
    b'{"n": [' + b"1," * 64 + b"1]}",
    b"[" * 3000 + b"]" * 3000,
    b'{"n":' * 1000 + b"1" + b"}" * 1000,
]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**40), 10**40),
    st.integers(-3, 30),
    st.floats(),  # NaN and infinities too: json.dumps writes NaN and Infinity
    utf8_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(utf8_text, inner, max_size=4),
    max_leaves=8,
)
good_ns = st.integers(0, 100) | st.integers(0, 20_000)
batches = st.lists(good_ns | json_values, max_size=8)  # good members with bad ones mixed in
json_requests = st.fixed_dictionaries(
    {"n": good_ns | json_values | batches},
    optional={
        "algo": st.sampled_from(ALGORITHMS) | json_values,
        "extra": json_values,
    },
)
json_bodies = st.builds(
    lambda doc, encoding: json.dumps(doc).encode(encoding),
    json_requests | json_values,
    st.sampled_from(["utf-8"] * 6 + ["utf-16", "utf-32", "utf-8-sig"]),
)


def _sized(kind: str, size: int) -> bytes:
    """A body of exactly ``size`` bytes: digits, a padded JSON request, or noise."""
    if kind == "digits":
        return (b"0" * size + b"7")[-size:] if size else b""
    if kind == "json":
        head, tail = b'{"n": 30, "pad": "', b'"}'
        return head + b"x" * max(0, size - len(head) - len(tail)) + tail
    return bytes(range(256)) * (size // 256) + bytes(range(size % 256))


sized_bodies = st.builds(
    _sized,
    st.sampled_from(["digits", "json", "noise"]),
    st.sampled_from([MAX_BODY - 1, MAX_BODY, MAX_BODY + 1, 4 * MAX_BODY]),
)
bodies = st.one_of(
    st.binary(max_size=48),
    st.sampled_from(NEAR_MISSES),
    st.integers(0, 10**25).map(lambda n: str(n).encode()),
    st.from_regex(rb"\A[ +\-]?[0-9.eEx_]{1,10}\s?\Z"),
    json_bodies,
    sized_bodies,
)
short_strings = st.one_of(
    st.sampled_from(["", "x" * 255, "é" * 127]),
    utf8_text,
    st.binary(max_size=8).map(lambda b: NOT_UTF8 + b),  # pika passes these on as bytes
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            TEXT,
            JSON,
            "application/json; charset=utf-8",
            "Application/JSON",
            " application/json ",
            "application/json;" + "x" * 230,
            "text/plain; charset=us-ascii",
            "application/xml",
            "application/octet-stream",
            "json",
        ]
    ),
    short_strings,
)
algo_types = st.none() | st.sampled_from([*ALGORITHMS, "FAST", "slow"]) | short_strings
int64s = st.integers(-(2**63), 2**63 - 1)
header_scalars = st.one_of(
    st.none(),
    st.booleans(),
    int64s,
    utf8_text,
    st.binary(max_size=12),
    st.decimals(-(10**6), 10**6, places=3, allow_nan=False),
    st.datetimes(datetime.datetime(1970, 1, 2), datetime.datetime(9999, 12, 30)),
)
header_values = st.recursive(
    header_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(utf8_text, inner, max_size=3),
    max_leaves=5,
)
# Deadlines are either long past or far ahead, never close enough to now to be a race.
deadlines = st.one_of(
    st.sampled_from([-(2**63), -1, 0, 1, NOW_MS - 3_600_000, NOW_MS + 864_000_000, 2**63 - 1]),
    st.integers(-(10**6), 10**6),
    header_values,
)
headers = st.none() | st.builds(
    lambda known, other: {**other, **known},
    st.fixed_dictionaries(
        {},
        optional={
            DEADLINE_HEADER: deadlines,
            DELIVERIES_HEADER: header_values,
            QUORUM_DELIVERIES: st.integers(-5, 10) | header_values,
        },
    ),
    st.dictionaries(utf8_text, header_values, max_size=3),
)
odd_reply_tos = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "",
            SELF,
            "amq.rabbitmq.reply-to.garbage",
            "amq.rabbitmq.reply-to.",
            "amq.gen-no-such-queue",
            "amq.direct",
            "q" * 255,
            NOT_UTF8,
        ]
    ),
    # Never "amq.rabbitmq.reply-to.X.Y": RabbitMQ drops the connection of whoever publishes
    # to such an address (see the regression test below), so the fuzzer steers clear.
    utf8_text.filter(lambda s: not s.startswith("amq.rabbitmq.reply-to")),
)
# Three in four messages ask for a reply where this test can see it.
reply_tos = st.integers(0, 3).flatmap(lambda k: st.just(DIRECT) if k else odd_reply_tos)
correlation_ids = st.one_of(
    st.just(None),
    st.just(""),
    st.sampled_from(["", "c" * 230, "é" * 110, "\U0001f600" * 50]),
    utf8_text,
    st.binary(max_size=12).map(lambda b: NOT_UTF8 + b),
)


@dataclasses.dataclass(frozen=True)
class Message:
    body: bytes
    content_type: str | bytes | None
    type: str | bytes | None
    headers: dict[str, Any] | None
    reply_to: str | bytes | None
    correlation_id: str | bytes | None  # a prefix made unique when sent, unless None or ""


messages = st.builds(
    Message, bodies, content_types, algo_types, headers, reply_tos, correlation_ids
)


def as_received(value: str | bytes | None) -> str | bytes | None:
    """A short string as pika hands it over: text if it is UTF-8, else bytes."""
    if isinstance(value, bytes):
        with contextlib.suppress(UnicodeDecodeError):
            return value.decode()
    return value


def unique(prefix: str | bytes | None, suffix: str) -> str | bytes | None:
    """The correlation id to send: ``prefix`` made unique by ``suffix``, within 255 bytes;
    None and "" are sent as they are (their replies are counted, not matched)."""
    if not prefix:
        return prefix
    if isinstance(prefix, bytes):
        return prefix[: 255 - len(suffix)] + suffix.encode()
    while len((prefix + suffix).encode()) > 255:
        prefix = prefix[:-1]
    return prefix + suffix


def expects_reply(message: Message) -> bool:
    """Whether the server must answer ``message`` where this test can see it: its reply_to
    is our direct reply-to, and it carries no integer deadline that has passed (such a
    request is skipped, by design: its caller has given up)."""
    if message.reply_to != DIRECT:
        return False
    deadline = (message.headers or {}).get(DEADLINE_HEADER)
    expired = type(deadline) is int and deadline < time.time() * 1000
    return not expired


def check_answer(message: Message, props: Any, body: bytes) -> str | None:
    """What is wrong with ``body`` as the reply to ``message``, or None."""
    if props.content_type == TEXT:
        if not message.body.isdigit():
            return "a text answer to a request that is not decimal digits"
        expected = gmpy2.fib(int(message.body.lstrip(b"0") or b"0")).digits()
        return None if body == expected.encode() else f"wrong answer {body[:60]!r}"
    if props.content_type != JSON:
        return f"content type {props.content_type!r}"
    try:
        doc = json.loads(body)
    except ValueError:
        return "a reply that is not JSON"
    if "error" in doc:
        error = doc["error"]
        if error["code"] not in ERROR_CODES or error["code"] == ErrorCode.INTERNAL:
            return f"error code {error['code']!r}: {error['message']}"
        return None if error["message"].endswith(".") else "an error message with no full stop"
    request = json.loads(message.body)
    ns = request["n"] if "results" in doc else [request["n"]]
    got = doc["results"] if "results" in doc else [doc["result"]]
    expected = [gmpy2.fib(n).digits() for n in ns]
    return None if got == expected else f"wrong answers {str(got)[:80]}"


# -- publishing --------------------------------------------------------------------------


class FuzzClient(RawClient):
    """RawClient that sends exactly the properties it is given (None and "" included)."""

    def send(self, message: Message, correlation_id: str | bytes | None) -> None:
        reply_to = self.queue if message.reply_to == SELF else message.reply_to
        properties = pika.BasicProperties(
            content_type=message.content_type,
            type=message.type,
            headers=message.headers,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )
        self.channel.basic_publish("", self.queue, message.body, properties)

    def waiting(self) -> int:
        return self.channel.queue_declare(self.queue, passive=True).method.message_count


class Ledger:
    """The replies owed to a FuzzClient's messages, over all the lists it sends."""

    def __init__(self, raw: FuzzClient) -> None:
        self.raw = raw
        self.owed: Counter[str | bytes | None] = Counter()
        self.sent: dict[str | bytes | None, Message] = {}
        self.messages = 0

    def send(self, batch: list[Message]) -> None:
        """Publish ``batch``, wait for the replies it is owed, check them, and see the
        queue drain. (A late second reply is caught by the next check, or the last.)"""
        keys = []
        for message in batch:
            correlation_id = unique(message.correlation_id, f"#{self.messages}")
            self.messages += 1
            self.raw.send(message, correlation_id)
            if expects_reply(message):
                key = as_received(correlation_id)
                self.owed[key] += 1
                self.sent[key] = message
                keys.append(key)
        self.raw.wait(self.owed.total(), timeout=20)
        self.check_counts()
        for key in keys:
            if key:  # None and "" are shared by many messages: counted, not matched
                [(props, body)] = self.raw.replies[key]
                problem = check_answer(self.sent[key], props, body)
                assert problem is None, f"{problem} for {self.sent[key]}"
        deadline = time.monotonic() + 10
        while self.raw.waiting() and time.monotonic() < deadline:
            self.raw.settle(0.05)
        assert self.raw.waiting() == 0, "messages left in the queue"

    def check_counts(self) -> None:
        """Every message owed a reply got exactly one, carrying its correlation id."""
        got = Counter({key: len(replies) for key, replies in self.raw.replies.items()})
        wrong = {key: (got[key], n) for key, n in (self.owed | got).items() if got[key] != n}
        assert not wrong, "replies (got, owed) per correlation id: " + "; ".join(
            f"{key!r}: {counts} for {self.sent.get(key)}" for key, counts in list(wrong.items())[:5]
        )


# A failing list is reported with its repr, hundreds of kB: the warning about that must not
# (through filterwarnings = error) hide the failure itself.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_thousands_of_generated_messages_each_get_one_reply_and_no_worker_dies(serve, queue):
    server = serve(*SERVER_ARGS, workers=2)
    workers = sorted(server.worker_pids())
    raw = FuzzClient(URL, queue)
    ledger = Ledger(raw)

    # Each example publishes a whole list, then waits for its replies: a round trip per
    # message would be far too slow. Lists of 50 to 80 (60 of them: at least 3,000 messages
    # however small hypothesis draws them) stay clear of the size at which
    # hypothesis starts discarding examples. No shrinking: a failure already names the
    # messages that went wrong (pin them below), and each step would republish a list.
    @settings(
        max_examples=60,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(messages, min_size=50, max_size=80))
    def fuzz(batch: list[Message]) -> None:
        ledger.send(batch)

    try:
        fuzz()
        raw.settle(0.5)  # time for a reply that should not come
        ledger.check_counts()
    finally:
        raw.close()
    print(f"\nfuzz: {ledger.messages:,} messages, {ledger.owed.total():,} replies checked")
    assert ledger.messages >= 2000
    assert sorted(server.worker_pids()) == workers
    for sign in (") died (", "lost the connection to", "Traceback (most recent call last)"):
        assert sign not in server.text, server.text[-3000:]
    with Client(URL, queue=queue, timeout=10) as client:
        assert client.call(30) == 832040


# -- the nasty examples, pinned ------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzClient]:
    """One server for all the pinned examples (each is one message), with the fuzz bounds."""
    queue = f"fibrpc-test-{uuid.uuid4().hex[:10]}"
    server = start_server(queue, tmp_path_factory.mktemp("pinned"), *SERVER_ARGS, workers=1)
    raw = FuzzClient(URL, queue)
    try:
        yield raw
    finally:
        raw.close()
        server.stop()
        assert ") died (" not in server.text
        conn = broker_connection()
        conn.channel().queue_delete(queue)
        conn.close()


REFUSED = [
    # the near-miss numbers, in the text form
    (b" 30", {}, "malformed"),
    (b"3e1", {}, "not_an_integer"),
    (b"0x1e", {}, "malformed"),
    ("١٢".encode(), {}, "malformed"),  # Arabic-Indic digits: not ASCII
    ("\u00b3".encode(), {}, "malformed"),  # superscript three
    (b"-0", {}, "negative"),  # no sign at all, as docs/protocol.md says (tests/test_protocol.py)
    (b"+30", {}, "not_an_integer"),
    (b"9" * 5000, {}, "out_of_range"),
    (b"-" + b"9" * 5000, {}, "negative"),
    (b"", {}, "malformed"),
    (b"\xef\xbb\xbf30", {}, "malformed"),
    # JSON of the wrong shape or type
    (b"", {"content_type": JSON}, "malformed"),
    (b"{}", {"content_type": JSON}, "malformed"),
    (b"[]", {"content_type": JSON}, "malformed"),
    (b"30", {"content_type": JSON}, "malformed"),
    (b"\xef\xbb\xbf{}", {"content_type": JSON}, "malformed"),
    (b"[" * 3000 + b"]" * 3000, {"content_type": JSON}, "malformed"),
    (b'{"n": true}', {"content_type": JSON}, "not_an_integer"),
    (b'{"n": null}', {"content_type": JSON}, "not_an_integer"),
    (b'{"n": "30"}', {"content_type": JSON}, "not_an_integer"),
    (b'{"n": NaN}', {"content_type": JSON}, "not_an_integer"),
    (b'{"n": 1e400}', {"content_type": JSON}, "not_an_integer"),
    (b'{"n": {"n": 30}}', {"content_type": JSON}, "not_an_integer"),
    (b'{"n": [1, "2"]}', {"content_type": JSON}, "not_an_integer"),
    (b'{"n": [1, true]}', {"content_type": JSON}, "not_an_integer"),
    (b'{"n": [1, [2]]}', {"content_type": JSON}, "not_an_integer"),
    (b'{"n": [1, -2]}', {"content_type": JSON}, "negative"),
    (b'{"n": ' + b"9" * 5000 + b"}", {"content_type": JSON}, "out_of_range"),
    (b'{"n": -' + b"9" * 5000 + b"}", {"content_type": JSON}, "out_of_range"),
    (b'{"n": 30, "algo": null}', {"content_type": JSON}, "unknown_algorithm"),
    (b'{"n": 30, "algo": ["fast"]}', {"content_type": JSON}, "unknown_algorithm"),
    (b'{"n": 30, "algo": "FAST"}', {"content_type": JSON}, "unknown_algorithm"),
    (b'{"n": [' + b"1," * 64 + b"1]}", {"content_type": JSON}, "batch_too_large"),
    # the body's size, content types and the type property
    (b"0" * MAX_BODY + b"7", {}, "body_too_large"),
    (b'{"n": 30}', {"content_type": "application/xml"}, "unsupported_content_type"),
    (b"30", {"content_type": "x" * 255}, "unsupported_content_type"),
    # found by the fuzzer: pika hands a content type that is not UTF-8 over as bytes, and
    # the server answered "internal" (fixed in fibrpc/protocol.py, media_type)
    (b"30", {"content_type": NOT_UTF8}, "unsupported_content_type"),
    (b"30", {"type": "slow"}, "unknown_algorithm"),
    (b"30", {"type": NOT_UTF8}, "unknown_algorithm"),
]


@pytest.mark.broker
@pytest.mark.parametrize(("body", "props", "code"), REFUSED, ids=[repr(r)[:50] for r in REFUSED])
def test_a_nasty_request_is_refused_with_its_exact_code(pinned, body, props, code):
    corr_id = pinned.publish(body, **props)
    assert pinned.error_code(corr_id) == code


F30 = b"832040"
ANSWERED = [
    (b"0" * (MAX_BODY - 2) + b"30", {}, F30),  # exactly the largest body
    (b"30", {"type": ""}, F30),
    (b"30", {"content_type": TEXT}, F30),
    (b'{"n": 30}', {"content_type": "Application/JSON; charset=utf-8"}, b'{"result":"832040"}'),
    ('{"n": 30}'.encode("utf-16"), {"content_type": JSON}, b'{"result":"832040"}'),
    (b'{"n": -0}', {"content_type": JSON}, b'{"result":"0"}'),  # JSON's -0 is the integer 0
    (b'{"n": -0, "n": 30}', {"content_type": JSON}, b'{"result":"832040"}'),  # the last wins
    (b'{"n": [], "algo": "iter"}', {"content_type": JSON}, b'{"results":[]}'),
    # headers of the wrong type are ignored, never an error
    (b"30", {"headers": {DEADLINE_HEADER: "soon"}}, F30),
    (b"30", {"headers": {DEADLINE_HEADER: True}}, F30),
    (b"30", {"headers": {DEADLINE_HEADER: [1]}}, F30),
    (b"30", {"headers": {DEADLINE_HEADER: datetime.datetime(2000, 1, 1)}}, F30),
    (b"30", {"headers": {DEADLINE_HEADER: 2**63 - 1}}, F30),
    (b"30", {"headers": {DELIVERIES_HEADER: "many"}}, F30),
    (b"30", {"headers": {DELIVERIES_HEADER: 2**63 - 1}}, F30),  # only counted on redelivery
    (b"30", {"headers": {"x-delivery-count": "one"}}, F30),
    (b"30", {"headers": {"x-delivery-count": -5}}, F30),
    # a request that claims (in the quorum queues' header) to have been delivered 10 times
    # is answered: only a request a worker died computing is charged (fibrpc.inflight),
    # so a client cannot get its own request refused as poison
    (b"30", {"headers": {"x-delivery-count": 10}}, F30),
]


@pytest.mark.broker
@pytest.mark.parametrize(
    ("body", "props", "answer"), ANSWERED, ids=[repr(a)[:50] for a in ANSWERED]
)
def test_an_odd_but_valid_request_is_answered(pinned, body, props, answer):
    assert pinned.reply(pinned.publish(body, **props))[1] == answer


@pytest.mark.broker
@pytest.mark.parametrize("deadline", [-(2**63), -1, 0, NOW_MS - 1])
def test_a_request_whose_integer_deadline_has_passed_is_skipped_without_a_reply(pinned, deadline):
    skipped = pinned.publish(b"30", headers={DEADLINE_HEADER: deadline})
    after = pinned.publish(b"31")
    assert pinned.reply(after)[1] == b"1346269"
    pinned.settle(0.2)
    assert skipped not in pinned.replies


@pytest.mark.broker
@pytest.mark.parametrize(
    "correlation_id",
    [None, "", "c" * 255, "é" * 127, "\U0001f600" * 63, "\x00", NOT_UTF8],
    ids=["none", "empty", "255-bytes", "accents", "emoji", "nul", "not-utf-8"],
)
def test_a_reply_carries_any_correlation_id_back_unchanged(pinned, correlation_id):
    pinned.replies.clear()
    pinned.send(Message(b"30", None, None, None, DIRECT, None), correlation_id)
    pinned.wait(1)
    pinned.settle(0.1)
    assert list(pinned.replies) == [correlation_id]
    [(_props, body)] = pinned.replies[correlation_id]
    assert body == F30


@pytest.mark.broker
def test_a_reply_to_that_names_no_queue_or_the_request_queue_costs_nothing(pinned):
    for reply_to in ["", "amq.gen-no-such-queue", "amq.rabbitmq.reply-to.garbage", NOT_UTF8]:
        pinned.send(Message(b"30", None, None, None, reply_to, None), "lost")
    pinned.send(Message(b"30", None, None, None, SELF, None), "loops-back-once")
    assert pinned.reply(pinned.publish(b"31"))[1] == b"1346269"
    deadline = time.monotonic() + 5
    while pinned.waiting() and time.monotonic() < deadline:
        pinned.settle(0.05)
    assert pinned.waiting() == 0


# -- server bugs found while building the fuzzer ----------------------------------------------
#
# Regression tests: each of these once wedged a server with a single message (fixed in
# fibrpc/amqp.py: valid_reply_to and the tolerant header decoder; and in the worker, now
# fibrpc/requestpath.py: a poison request is acked before its refusal is published).


def test_a_reply_to_address_the_broker_rejects_costs_that_request_alone(serve, queue):
    # RabbitMQ closes the whole connection (541 INTERNAL_ERROR) of anyone who publishes to
    # "amq.rabbitmq.reply-to.X.Y" when X is not a channel it knows, as with a direct
    # reply-to address from another broker (rabbitmq/rabbitmq-server#3751). The worker's
    # reply does exactly that: the request and all it had prefetched are requeued, come
    # back first, and kill the connection again, hundreds of times a second; the requests
    # behind it are refused as poison or never answered at all.
    server = serve(workers=1)
    raw = FuzzClient(URL, queue)
    try:
        bad = Message(b"30", None, None, None, "amq.rabbitmq.reply-to.abc.def", None)
        raw.send(bad, "from-another-broker")
        good = {raw.publish(str(n).encode()): n for n in range(50)}
        raw.wait(len(good), timeout=10)
        answers = {n: raw.replies.get(c, [(None, b"no reply")])[0][1] for c, n in good.items()}
        assert answers == {n: gmpy2.fib(n).digits().encode() for n in good.values()}
        deadline = time.monotonic() + 5
        while raw.waiting() and time.monotonic() < deadline:
            raw.settle(0.05)
        assert raw.waiting() == 0, "the bad request is still going round"
    finally:
        raw.close()
    assert server.text.count("lost the connection to") <= 1, server.text[-2000:]


#: A direct reply-to address that reads as RabbitMQ's own (an Erlang pid, base64) but
#: names a node nobody knows: it passes ``amqp.valid_reply_to``, and RabbitMQ 3.10 closes
#: the connection of whoever publishes to it (541 INTERNAL_ERROR), as it does a worker's
#: channel for a reply to a client on another node of a 3.10 cluster (issue #20).
UNKNOWN_NODE_REPLY_TO = (
    "amq.rabbitmq.reply-to."
    + base64.b64encode(
        b"\x83Xv\x00\rreply@1234567\x00\x00d\xac\x00\x00\x00\x00k\x12\xdc\x89"
    ).decode()
    + ".CIYZZw94MzkuiD4wml036g=="
)


def test_a_request_whose_reply_the_broker_refuses_is_dropped_after_its_deliveries(serve, queue):
    # Each reply closed the worker's connection before its ack: the request came back and
    # was replied again, about 50 times a second, never charged (issue #20, item 3). Now it
    # is charged each time, and dropped with one error line once past --max-deliveries;
    # the requests behind it are answered.
    assert amqp.valid_reply_to(UNKNOWN_NODE_REPLY_TO)
    server = serve(workers=1)
    raw = FuzzClient(URL, queue)
    try:
        bad = Message(b"30", None, None, None, UNKNOWN_NODE_REPLY_TO, None)
        raw.send(bad, "refused-reply")
        good = {raw.publish(str(n).encode()): n for n in range(50)}
        raw.wait(len(good), timeout=30)
        answers = {n: raw.replies.get(c, [(None, b"no reply")])[0][1] for c, n in good.items()}
        assert answers == {n: gmpy2.fib(n).digits().encode() for n in good.values()}
        # The queue is empty for a moment while the worker holds the request: wait for
        # the outcome instead, the drop (or, where no reply closes anything, its answer).
        markers = ("lost the connection to", "closed the channel (")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "dropped request 'refused-reply'" in server.text:
                break
            if not any(m in server.text for m in markers) and raw.waiting() == 0:
                break
            raw.settle(0.05)
        raw.settle(0.5)
        assert raw.waiting() == 0, "the request whose reply is refused is still going round"
    finally:
        raw.close()
    lines = server.text.splitlines()
    closes = sum(any(m in line for m in markers) for line in lines)
    assert closes <= DEFAULT_MAX_DELIVERIES, server.text[-3000:]
    dropped = [line for line in lines if "dropped request 'refused-reply'" in line]
    if closes:  # RabbitMQ 3.10; a broker that drops such a reply quietly closes nothing
        assert len(dropped) == 1, server.text[-3000:]
        assert UNKNOWN_NODE_REPLY_TO in dropped[0] and "INTERNAL_ERROR" in dropped[0]
    else:
        assert not dropped


class HeaderFromYear10000(pika.BasicProperties):
    """Properties whose headers hold an AMQP timestamp in the year 10000: valid on the wire
    (64 bits of seconds), and other AMQP clients can send it, but pika's decoder raises on
    it (``datetime.fromtimestamp``), and pika's encoder cannot write it, hence this class."""

    def encode(self) -> list[bytes]:
        name = b"x-sent-at"
        table = bytes([len(name)]) + name + b"T" + struct.pack(">Q", 253_402_300_800)
        pieces = [struct.pack(">I", len(table)), table]
        for value in (self.correlation_id, self.reply_to):
            raw = value.encode()
            pieces += [bytes([len(raw)]), raw]
        flags = self.FLAG_HEADERS | self.FLAG_CORRELATION_ID | self.FLAG_REPLY_TO
        return [struct.pack(">H", flags), *pieces]


def test_a_header_pika_cannot_decode_does_not_stop_the_server(serve, queue):
    # pika raises while decoding the message's header frame, before fibrpc sees it; the
    # worker reconnects, is handed the same message first, and so on for ever: no request
    # behind it is ever answered, and the log blames an unreachable broker.
    serve(workers=1)
    raw = FuzzClient(URL, queue)
    try:
        props = HeaderFromYear10000(reply_to=DIRECT, correlation_id="year-10000")
        raw.channel.basic_publish("", queue, b"30", props)
        assert raw.reply(raw.publish(b"31"), timeout=10)[1] == b"1346269"
        deadline = time.monotonic() + 5
        while raw.waiting() and time.monotonic() < deadline:
            raw.settle(0.05)
        assert raw.waiting() == 0
    finally:
        raw.close()
