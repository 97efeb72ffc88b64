#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 20 s each; pass another
# number of seconds for a longer run), starting from the committed seeds and
# replaying every saved regression input first. Fails on any crash, panic,
# leak of the memory limit (2 GiB) or input that takes over 10 s.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-20}
targets=(pack index tree snapshot config agent_config encrypted_object writer_key signed_object host_registry)
cargo +nightly fuzz build -s none
for t in "${targets[@]}"; do
    if compgen -G "regressions/$t/*" >/dev/null; then
        cargo +nightly fuzz run -s none "$t" regressions/"$t"/* -- -runs=1
    fi
    mkdir -p corpus/"$t"
    out=$(cargo +nightly fuzz run -s none "$t" corpus/"$t" seeds/"$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=262144 2>&1) || {
        echo "$out" | tail -40
        echo "fuzz target $t failed: the input is under fuzz/artifacts/$t; copy it to fuzz/regressions/$t/ with the fix"
        exit 1
    }
    echo "$out" | grep -E '^Done [0-9]+ runs' | sed "s/^/fuzz $t: /"
done
