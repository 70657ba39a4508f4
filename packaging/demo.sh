#!/usr/bin/env bash
# The demo: start studio-agent on its embedded defaults (no config file, no broker, no cloud:
# the local queue root ~/.studioml/queue and local storage under its state dir), submit the bundled
# example experiment, wait for it, print where the results are, then stop the agent (drain).
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp -t studio-agent-demo.XXXXXX.log)
studio-agent run >"$log" 2>&1 &
agent=$!
trap 'kill -TERM $agent 2>/dev/null || true; wait $agent 2>/dev/null || true' EXIT

echo "studio-agent running as pid $agent (log: $log)"
status=0
studio-agent submit examples/hello --queue local_demo --wait 300 -- 5 --flag || status=$?
echo "--- agent log ---"
cat "$log"
exit $status
