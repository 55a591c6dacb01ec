#!/usr/bin/env bash
# Run every fuzz target for a bounded time (default 60 s each), starting
# from the seeds in gateway/fuzz/seeds/<target>/. Installs cargo-fuzz when
# missing. libFuzzer needs nightly compiler flags: RUSTC_BOOTSTRAP lets the
# stable toolchain take them. A crash leaves its input in
# gateway/fuzz/artifacts/<target>/ and makes this script fail.
#
#   gateway/fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(upgrade_request jwt config spool proxy_header)
fi

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/tidegate/fuzz-target}"

cargo fuzz build --debug-assertions

status=0
for target in "${targets[@]}"; do
  corpus="$(mktemp -d)"
  if [ -d "seeds/$target" ]; then cp -r "seeds/$target/." "$corpus/"; fi
  echo "== $target for ${seconds}s"
  if ! cargo fuzz run --debug-assertions "$target" "$corpus" -- \
      -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
      2>"$corpus.log"; then
    status=1
    echo "$target: FAILED; see $corpus.log and artifacts/$target/" >&2
    tail -40 "$corpus.log" >&2
  else
    grep -E "stat::number_of_executed_units|cov:" "$corpus.log" | tail -2
  fi
  rm -rf "$corpus"
done
exit "$status"
