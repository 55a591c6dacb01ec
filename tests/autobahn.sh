#!/usr/bin/env bash
# RFC 6455 conformance: the Autobahn|Testsuite fuzzing client against the
# real `tidegate` binary serving the bundled echo function, over ws:// (the
# plain listener) and wss://, cases 1 to 10. Fails unless every case is OK,
# NON-STRICT or INFORMATIONAL with a clean closing handshake.
#
#   tests/autobahn.sh [PATH-TO-TIDEGATE]
#
# The suite comes from ../shared/extern/autobahn (or $AUTOBAHN_DIR); its
# virtualenv and reports go to $AUTOBAHN_HOME (a fresh temporary directory
# when unset). Uses RabbitMQ on 127.0.0.1:5672 with a queue of its own,
# deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
binary="${1:-$target_dir/debug/tidegate}"
# The suite sits in the workplace's shared folder, beside the checkout; a
# clone made elsewhere (CI's) finds it beside the repository it was cloned
# from.
suite="${AUTOBAHN_DIR:-}"
if [ -z "$suite" ]; then
  origin="$(git remote get-url origin 2>/dev/null || true)"
  candidates=("$(cd .. && pwd)/shared/extern/autobahn")
  case "$origin" in
    /*) candidates+=("$(dirname "$origin")/shared/extern/autobahn") ;;
    file://*) candidates+=("$(dirname "${origin#file://}")/shared/extern/autobahn") ;;
  esac
  for candidate in "${candidates[@]}"; do
    if [ -x "$candidate/run.sh" ]; then suite="$candidate"; break; fi
  done
fi
[ -x "$binary" ] || { echo "autobahn.sh: $binary not built (cargo build --bin tidegate)" >&2; exit 2; }
[ -x "$suite/run.sh" ] || { echo "autobahn.sh: no Autobahn suite at $suite (set AUTOBAHN_DIR)" >&2; exit 2; }

own_home=""
if [ -z "${AUTOBAHN_HOME:-}" ]; then own_home="$(mktemp -d)"; fi
export AUTOBAHN_HOME="${AUTOBAHN_HOME:-$own_home}"
state="$(mktemp -d)"
queue="tidegate.autobahn.$$.$(date +%s)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ws_port="$(free_port)"

"$suite/install.sh" >"$AUTOBAHN_HOME/install.log" 2>&1 \
  || { cat "$AUTOBAHN_HOME/install.log"; exit 2; }

# Autobahn sends messages of up to 16 MiB (cases 9.*): raise the message
# limit and the function's memory for them; everything else is the default.
TIDEGATE__SERVER__LISTEN=127.0.0.1:0 \
TIDEGATE__SERVER__PLAIN_LISTEN="127.0.0.1:$ws_port" \
TIDEGATE__ADMIN__LISTEN=127.0.0.1:0 \
TIDEGATE__SERVER__STATE_DIR="$state" \
TIDEGATE__QUEUE__QUEUE="$queue" \
TIDEGATE__WEBSOCKET__MAX_MESSAGE_SIZE=20971520 \
TIDEGATE__RUNTIME__MEMORY_LIMIT=134217728 \
RUST_LOG=warn \
  "$binary" serve --dev >"$state/stdout.log" 2>"$state/stderr.log" &
gateway=$!
cleanup() {
  kill "$gateway" 2>/dev/null || true
  wait "$gateway" 2>/dev/null || true
  rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true
  rm -rf "$state"
}
trap cleanup EXIT

wss=""
for _ in $(seq 1 300); do
  wss="$(sed -n 's|^Tidegate listening on wss://\([^/]*\)/.*|\1|p' "$state/stdout.log")"
  [ -n "$wss" ] && break
  kill -0 "$gateway" 2>/dev/null || { cat "$state/stderr.log"; exit 2; }
  sleep 0.1
done
[ -n "$wss" ] || { echo "autobahn.sh: the gateway did not start" >&2; cat "$state/stderr.log"; exit 2; }

status=0
for url in "ws://127.0.0.1:$ws_port/" "wss://$wss/"; do
  echo "== Autobahn cases 1-10 against $url"
  OUTDIR="$AUTOBAHN_HOME/reports-${url%%:*}" EXCLUDE='12.*,13.*' "$suite/run.sh" "$url" tidegate \
    || status=$?
done
if [ "$status" -ne 0 ]; then
  echo "autobahn.sh: conformance failures; reports under $AUTOBAHN_HOME, gateway log:" >&2
  tail -50 "$state/stderr.log" >&2
elif [ -n "$own_home" ]; then
  rm -rf "$own_home"
fi
exit "$status"
