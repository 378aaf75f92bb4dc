#!/usr/bin/env bash
# The two set-up commands of README.md.
#   scripts/dev.sh serve [fibrpc serve options]  install, start the broker if needed, serve
#   scripts/dev.sh test  [pytest options]         install, start the broker if needed, lint,
#                                                 type-check and run the whole test suite
#                                                 on a private RabbitMQ 4 node, the client
#                                                 and worker tests again without the fast
#                                                 path, then the suite but its network
#                                                 faults on the local RabbitMQ (3.10)
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
    scripts/rabbitmq-root.sh trixie >/dev/null  # once per machine: RabbitMQ 4 for private nodes
    echo "== the test suite on a private RabbitMQ 4 node (every deprecated feature denied)"
    FIBRPC_TEST_BROKER=rabbitmq4 "$venv/bin/pytest" "$@"
    echo "== the client's and the worker's integration tests on pika's stock paths"
    FIBRPC_TEST_BROKER=local FIBRPC_FAST_PATH=0 "$venv/bin/pytest" "$@" \
      tests/test_client.py tests/test_end_to_end.py tests/test_fuzz.py tests/test_message_size.py
    # Network faults and the cluster run on RabbitMQ 4 only (private nodes), as do the
    # checks of RabbitMQ 4 itself; the docs' examples, the stand-ins, the pytest plugin,
    # tracing and the memo are the same whatever the broker, and ran above: the suite
    # stays well under 15 minutes.
    echo "== the test suite on the local RabbitMQ (but what is the same on any broker)"
    FIBRPC_TEST_BROKER=local exec "$venv/bin/pytest" "$@" \
      --ignore=tests/test_edge_faults.py --ignore=tests/test_cluster.py \
      --ignore=tests/test_rabbitmq4.py --ignore=tests/test_docs.py \
      --ignore=tests/test_testing.py --ignore=tests/test_pytest_plugin.py \
      --ignore=tests/test_tracing.py --ignore=tests/test_shared_memo.py \
      --ignore=tests/test_memo.py
    ;;
  unit)
    install "[test]"
    "$venv/bin/ruff" check .
    "$venv/bin/ruff" format --check .
    "$venv/bin/mypy"
    exec "$venv/bin/pytest" -m "not broker" "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh serve|test|unit [options]" >&2
    exit 2
    ;;
esac
