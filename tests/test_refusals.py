"""What RabbitMQ's refusals mean (``fibrpc.refusals``): pure readings of the broker's own
texts, taken word for word from RabbitMQ 3.10 and 4.0 nodes."""

from __future__ import annotations

import pytest

from fibrpc import refusals

DURABLE = (
    "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'rpc_queue' in vhost '/': "
    "received 'true' but current is 'false'"
)
QUEUE_TYPE = (
    "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'rpc_queue' in vhost "
    "'/': received the value 'quorum' of type 'longstr' but current is none"
)
MAX_LENGTH = (
    "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q.1' in vhost 'v': "
    "received none but current is the value '10' of type 'signedint'"
)
DEPRECATED = (
    "INTERNAL_ERROR - Feature `transient_nonexcl_queues` is deprecated.\nBy default, this "
    "feature can still be used for now."
)
SIZE = "PRECONDITION_FAILED - message size 18800043 is larger than configured max size 16777216"


@pytest.mark.parametrize(
    ("code", "text", "refused"),
    [
        (406, DURABLE, True),
        (406, SIZE, True),
        (405, "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue", True),
        (404, "NOT_FOUND - no queue 'q' in vhost '/'", True),
        (541, DEPRECATED, True),
        (541, "INTERNAL_ERROR - timeout waiting for the queue leader", False),
        (320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'", False),
        (501, "FRAME_ERROR", False),
    ],
)
def test_a_refusal_is_told_from_an_outage_by_its_code_and_text(code, text, refused):
    assert refusals.is_refusal(code, text) is refused


def test_the_access_codes_are_not_refusals_of_this_kind():
    assert {403, 530} == refusals.ACCESS_REFUSED_CODES
    assert not any(refusals.is_refusal(code, "") for code in refusals.ACCESS_REFUSED_CODES)


def test_an_inequivalent_argument_is_read_with_both_values():
    assert refusals.inequivalence(DURABLE) == refusals.Inequivalence(
        "rpc_queue", "durable", "true", "false"
    )
    assert refusals.inequivalence(QUEUE_TYPE) == refusals.Inequivalence(
        "rpc_queue", "x-queue-type", "quorum", "none"
    )
    assert refusals.inequivalence(MAX_LENGTH) == refusals.Inequivalence(
        "q.1", "x-max-length", "none", "10"
    )
    assert refusals.inequivalence(SIZE) is None


def test_a_durability_mismatch_names_the_queue_both_values_and_the_fix():
    text = refusals.explain_queue_refusal("rpc_queue", "classic", 406, DURABLE)
    assert text.startswith("Queue 'rpc_queue' already exists with durable = false,")
    assert "durable = true (a classic queue)" in text
    assert "rabbitmqctl delete_queue rpc_queue" in text


def test_a_type_mismatch_suggests_serving_the_queue_as_it_is():
    text = refusals.explain_queue_refusal("rpc_queue", "quorum", 406, QUEUE_TYPE)
    assert "already exists as a classic queue, but fibrpc declares a quorum queue" in text
    assert "--queue-type classic" in text


def test_a_denied_deprecated_feature_is_named():
    text = refusals.explain_queue_refusal("rpc_queue", "classic", 541, DEPRECATED)
    assert "deprecated feature transient_nonexcl_queues" in text


def test_any_other_refusal_still_names_the_queue_and_the_broker_words():
    text = refusals.explain_queue_refusal(
        "q", "classic", 406, "PRECONDITION_FAILED - queue limit in vhost '/' (1) is reached"
    )
    assert text.startswith("RabbitMQ refused to declare queue 'q' as a classic queue")
    assert "queue limit in vhost '/' (1) is reached" in text


def test_the_broker_s_largest_message_is_read_from_its_refusal():
    assert refusals.max_message_size(SIZE) == 16777216
    assert refusals.max_message_size(DURABLE) is None


#: RabbitMQ 4.0.5, closing the channel of a delivery unacked past consumer_timeout.
ACK_TIMEOUT = (
    "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value "
    "used: 5000 ms. This timeout value can be configured, see consumers doc guide to learn more"
)


def test_a_consumer_timeout_is_told_apart_and_says_what_to_raise():
    hint = refusals.ack_timed_out(ACK_TIMEOUT)
    assert hint is not None and "consumer_timeout" in hint and "consumer-timeout" in hint
    assert refusals.ack_timed_out(SIZE) is None
    assert refusals.ack_timed_out(DURABLE) is None


#: RabbitMQ 4.3.6, a passive declare by a user with no permission on the queue.
PASSIVE_REFUSED = (
    "ACCESS_REFUSED - configure access to queue 'jobs.v1' in vhost 'fibrpc' refused for user "
    "'fibrpc-client'"
)


def test_a_refused_consumer_count_names_the_user_vhost_and_the_write_permission_to_add():
    text = refusals.probe_refused("jobs.v1", 403, PASSIVE_REFUSED)
    assert "user 'fibrpc-client'" in text and "queue 'jobs.v1'" in text
    assert f"(403: {PASSIVE_REFUSED})" in text
    assert "4.2.6" in text
    assert text.endswith(
        r"rabbitmqctl set_permissions -p fibrpc fibrpc-client '^$' '^(amq\.default|jobs\.v1)$' "
        "'^$'."
    )


def test_a_refused_consumer_count_in_words_it_cannot_read_still_says_what_to_add():
    text = refusals.probe_refused("rpc_queue", 403, "ACCESS_REFUSED - something new")
    assert r"set_permissions -p VHOST USER '^$' '^(amq\.default|rpc_queue)$' '^$'." in text
