#!/usr/bin/env bash
# The two set-up commands of README.md.
#   scripts/dev.sh serve [fibrpc serve options]  install, start the broker if needed, serve
#   scripts/dev.sh test  [pytest options]         install, start the broker if needed, lint,
#                                                 type-check and run the whole test suite
# Both create ./.venv (Python 3.11+) on first use and install fibrpc into it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv

install() {
  local extras=$1
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
  fi
  "$venv/bin/python" -m pip install -q -e ".$extras"
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
    exec "$venv/bin/pytest" "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh serve|test [options]" >&2
    exit 2
    ;;
esac
