#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on $FIBRPC_BROKER_HOST:$FIBRPC_BROKER_PORT
# (default 127.0.0.1:5672): start the local one with `rabbitmq-server -detached` when
# nothing answers, then wait until it accepts connections. Exits non-zero, with a
# message saying why, when there is no broker to start or it does not come up in time.
set -euo pipefail
host=${FIBRPC_BROKER_HOST:-127.0.0.1}
port=${FIBRPC_BROKER_PORT:-5672}
wait_s=${FIBRPC_BROKER_WAIT:-90}

answers() { timeout 2 bash -c ">/dev/tcp/$host/$port" 2>/dev/null; }

if answers; then exit 0; fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "ensure-broker: nothing answers on $host:$port and rabbitmq-server is not installed" \
       "(apt-get install rabbitmq-server)" >&2
  exit 1
fi
echo "ensure-broker: starting RabbitMQ (rabbitmq-server -detached)" >&2
rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 1 "$wait_s"); do
  if answers; then
    # The port opens a moment before the broker accepts logins: wait for the app too.
    command -v rabbitmqctl >/dev/null 2>&1 && timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
    echo "ensure-broker: RabbitMQ is up on $host:$port" >&2
    exit 0
  fi
  sleep 1
done
echo "ensure-broker: RabbitMQ did not answer on $host:$port within ${wait_s}s" >&2
exit 1
