#!/usr/bin/env bash
# The two set-up commands of README.md.
#   scripts/dev.sh serve [fibrpc serve options]  install, start the broker if needed, serve
#   scripts/dev.sh test  [pytest options]         install, start the broker if needed, lint,
#                                                 type-check, then the four runs of pytest
#                                                 listed below (RabbitMQ 4.3, 4.0, 3.10)
#   scripts/dev.sh unit  [pytest options]         install, lint, type-check and run the tests
#                                                 that need no broker (pytest -m "not
#                                                 broker"): under a minute
# Each creates ./.venv (Python 3.11+) on first use and installs fibrpc into it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv

# Install only when the installed copy is missing or older than pyproject.toml: a second
# start is quiet, and works without a network.
install() {
  local extras=$1
  local stamp="$venv/.installed$extras"
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q -e ".$extras"
    touch "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  serve)
    install ""
    scripts/ensure-broker.sh
    exec "$venv/bin/fibrpc" serve --workers auto "$@"
    ;;
  test)
    install "[test]"
    scripts/ensure-broker.sh
    "$venv/bin/ruff" check .
    "$venv/bin/ruff" format --check .
    "$venv/bin/mypy"
    # Once per machine: the roots of the private RabbitMQ nodes (Debian sid: today's
    # RabbitMQ, 4.3.6 in December 2026; Debian trixie: 4.0.5).
    scripts/rabbitmq-root.sh sid >/dev/null
    scripts/rabbitmq-root.sh trixie >/dev/null
    # The runs (times of a fresh clone's .ci/run on the 2-core machine: 24 min 37 s in all
    # with the set-up in the CI of 2026-12-05, 27 min 37 s on the slower 2026-12-06, as
    # below; pytest --durations says where they go; docs/design.md):
    # 1. sid (4.3): the whole suite, on a private node.                   15.6 to 17.9 min
    # 2. trixie (4.0): what depends on the broker, on a private node: the files
    #    of $broker below.                                                    ~5.2 min
    # 3. the client's and the worker's tests on pika's stock paths, local broker. ~1 min
    # 4. local (3.10): what depends on the broker but the client's files (run 3
    #    has them), RabbitMQ 4.x itself and network faults.                   ~2.8 min
    # Tests marked any_line in those files (a network fault's handling, a stopped
    # worker shown as stuck) prove fibrpc's own behaviour: they run in 1 only.
    # What is the same on any broker (the pure units: kernels, protocol, handler, calls,
    # driver, frames, refusals...; and the docs' examples, the stand-ins, the pytest
    # plugin, tracing, metrics, the memo, bench, compose, logs, URLs, the asyncio
    # client's face over the same link) runs once, in 1.
    broker=(
      tests/test_amqp.py          # declarations, error translation
      tests/test_privileges.py    # least privilege (passive declare: 4.2.6+)
      tests/test_describe.py      # the server's documented permissions, control path included
      tests/test_faults.py        # kill -9, poison on classic and quorum queues
      tests/test_message_size.py  # the broker's max_message_size
      tests/test_client.py        # direct reply-to, no-server check, exit codes
      tests/test_end_to_end.py
      tests/test_fuzz.py          # forged reply-to addresses (direct reply-to: 4.2)
      tests/test_status.py        # passive declare, the management API
      tests/test_tls.py
    )
    four=(
      tests/test_rabbitmq4.py     # TTLs, deprecated features, quorum delivery counts
      tests/test_edge_faults.py   # network faults through a proxy
    )
    # tests/test_cluster.py makes a cluster of each line (3.10, 4.0, 4.3) itself: run 1.
    echo "== 1. the whole suite on RabbitMQ 4.3 (Debian sid, a private node)"
    FIBRPC_TEST_BROKER=sid "$venv/bin/pytest" --durations=15 "$@"
    echo "== 2. what depends on the broker on RabbitMQ 4.0 (Debian trixie, a private node)"
    FIBRPC_TEST_BROKER=trixie "$venv/bin/pytest" --durations=15 -m "not any_line" "$@" \
      "${broker[@]}" "${four[@]}"
    echo "== 3. the client's and the worker's integration tests on pika's stock paths"
    FIBRPC_TEST_BROKER=local FIBRPC_FAST_PATH=0 "$venv/bin/pytest" --durations=15 "$@" \
      tests/test_client.py tests/test_end_to_end.py tests/test_fuzz.py tests/test_message_size.py
    # Run 3 proved the client's files on 3.10 (through pika's stock paths; the wire is
    # the same): run 4 takes the rest of the broker's files there.
    echo "== 4. what depends on the broker on the local RabbitMQ (3.10)"
    FIBRPC_TEST_BROKER=local exec "$venv/bin/pytest" --durations=15 -m "not any_line" "$@" \
      tests/test_amqp.py tests/test_privileges.py tests/test_describe.py tests/test_faults.py \
      tests/test_status.py tests/test_tls.py
    ;;
  unit)
    install "[test]"
    "$venv/bin/ruff" check .
    "$venv/bin/ruff" format --check .
    "$venv/bin/mypy"
    exec "$venv/bin/pytest" -m "not broker" -n auto "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh serve|test|unit [options]" >&2
    exit 2
    ;;
esac
