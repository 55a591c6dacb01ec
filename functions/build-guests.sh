#!/usr/bin/env bash
# Builds the JavaScript and Python echo functions into components:
#
#   functions/build-guests.sh OUTDIR
#
# writes OUTDIR/echo-js.wasm and OUTDIR/echo-py.wasm. The tools are
# installed on first use, from the pinned versions in
# functions/js/echo/package-lock.json and functions/python/echo/requirements.txt,
# into TIDEGATE_GUEST_CACHE (default: ~/.cache/tidegate/guest-tools), one
# directory per lock file's digest. A component is rebuilt only when its
# inputs (its source, the WIT, the lock file) changed since it was built:
# a second run with nothing changed takes well under a second.
#
# Needs node and npm (for componentize-js), python3 with venv (for
# componentize-py), and sha256sum.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 64
fi

functions="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cache="${TIDEGATE_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tidegate/guest-tools}"
mkdir -p "$cache"
wit="$functions/wit"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The digest of the named files, in order, with their names.
digest() {
  (cd "$functions" && sha256sum "$@") | sha256sum | cut -c1-16
}

# True when $1 exists and was built from inputs with digest $2.
up_to_date() {
  if [[ -f "$1" && -f "$1.inputs" && "$(cat "$1.inputs")" == "$2" ]]; then
    echo "$(basename "$1"): up to date"
  else
    return 1
  fi
}

# Install tools into directory $1 by running "$@" there, unless an earlier
# run finished doing so.
install_once() {
  local dir="$1"
  shift
  [[ -f "$dir/.installed" ]] && return
  echo "installing tools into $dir"
  mkdir -p "$dir"
  (cd "$dir" && "$@")
  touch "$dir/.installed"
}

# Run "$@", a build that writes $work/out.wasm, then move that to $1 and
# record digest $2 beside it.
build() {
  local target="$1" inputs="$2" started
  shift 2
  started=$(date +%s%N)
  rm -f "$target.inputs"
  "$@"
  mv -f "$work/out.wasm" "$target"
  echo "$inputs" > "$target.inputs"
  echo "$(basename "$target"): $(stat -c %s "$target") bytes," \
    "built in $(( ($(date +%s%N) - started) / 1000000 )) ms"
}

# JavaScript: componentize-js (SpiderMonkey) with the WASI features the
# host does not grant left out: no wasi:http imports, no fetch-event export.
js="$functions/js/echo"
inputs=$(digest js/echo/echo.js js/echo/package.json js/echo/package-lock.json wit/world.wit build-guests.sh)
if ! up_to_date "$out/echo-js.wasm" "$inputs"; then
  tools="$cache/js-$(digest js/echo/package-lock.json)"
  install_once "$tools" sh -c \
    'cp "$1/package.json" "$1/package-lock.json" . && npm ci --no-audit --no-fund --loglevel=error' \
    sh "$js"
  mkdir "$work/js"
  cp "$js/echo.js" "$work/js/"
  build "$out/echo-js.wasm" "$inputs" \
    node "$tools/node_modules/@bytecodealliance/componentize-js/src/cli.js" \
    --wit "$wit/world.wit" --world-name handler -d http fetch-event \
    -o "$work/out.wasm" "$work/js/echo.js"
fi

# Python: componentize-py, from a copy of the source so that the checkout
# gets no __pycache__.
py="$functions/python/echo"
inputs=$(digest python/echo/app.py python/echo/requirements.txt wit/world.wit build-guests.sh)
if ! up_to_date "$out/echo-py.wasm" "$inputs"; then
  venv="$cache/py-$(digest python/echo/requirements.txt)"
  install_once "$venv" sh -c \
    'python3 -m venv . && bin/pip install --quiet --disable-pip-version-check -r "$1"' \
    sh "$py/requirements.txt"
  mkdir "$work/py"
  cp "$py/app.py" "$work/py/"
  (cd "$work/py" && build "$out/echo-py.wasm" "$inputs" \
    "$venv/bin/componentize-py" -d "$wit" -w handler componentize app -o "$work/out.wasm")
fi
