#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on $FIBRPC_BROKER_HOST:$FIBRPC_BROKER_PORT
# (default 127.0.0.1:5672): start the local one with `rabbitmq-server -detached` when
# nothing answers, then wait until it accepts connections. Exits non-zero, with the
# broker's own reason, when there is no broker to start, when it stops while starting
# (at once), or when it does not come up in time.
set -euo pipefail
host=${FIBRPC_BROKER_HOST:-127.0.0.1}
port=${FIBRPC_BROKER_PORT:-5672}
wait_s=${FIBRPC_BROKER_WAIT:-90}

answers() { timeout 2 bash -c ">/dev/tcp/$host/$port" 2>/dev/null; }
running() { pgrep -f 'beam.*rabbit' >/dev/null 2>&1; }
why() {
  echo "ensure-broker: what rabbitmq-server said:" >&2
  sed 's/^/  /' "$out" >&2 || true
  for log in /var/log/rabbitmq/*.log; do
    [ -f "$log" ] || continue
    echo "ensure-broker: the end of $log:" >&2
    tail -n 20 "$log" | sed 's/^/  /' >&2
  done
}

if answers; then exit 0; fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "ensure-broker: nothing answers on $host:$port and rabbitmq-server is not installed" \
       "(apt-get install rabbitmq-server)" >&2
  exit 1
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "ensure-broker: starting RabbitMQ (rabbitmq-server -detached)" >&2
if ! rabbitmq-server -detached >"$out" 2>&1; then
  echo "ensure-broker: rabbitmq-server -detached failed" >&2
  why
  exit 1
fi
for second in $(seq 1 "$wait_s"); do
  if answers; then
    # The port opens a moment before the broker accepts logins: wait for the app too.
    command -v rabbitmqctl >/dev/null 2>&1 && timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
    echo "ensure-broker: RabbitMQ is up on $host:$port" >&2
    exit 0
  fi
  if [ "$second" -ge 5 ] && ! running; then
    echo "ensure-broker: RabbitMQ stopped while starting" >&2
    why
    exit 1
  fi
  sleep 1
done
echo "ensure-broker: RabbitMQ did not answer on $host:$port within ${wait_s}s" >&2
why
exit 1
