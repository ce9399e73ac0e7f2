#!/usr/bin/env bash
# ./quickstart.sh demo   set up .venv and run the built-in demo
# ./quickstart.sh test   set up .venv and run the test suite
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-demo}
shift || true
bash scripts/setup_env.sh
case "$what" in
  demo) exec .venv/bin/python -m solo_fast demo "$@" ;;
  test) exec .venv/bin/python -m pytest tests "$@" ;;
  *) echo "usage: ./quickstart.sh demo|test [args...]" >&2; exit 2 ;;
esac
