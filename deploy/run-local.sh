#!/usr/bin/env bash
# Two replicas of the server on 127.0.0.1:8718 and :8719, each with half of this machine's cores,
# and HAProxy in front with deploy/haproxy.cfg: clients use ws://127.0.0.1:8716/ws. Run it from the
# project's virtual environment (README: Set up); Ctrl-C or SIGTERM stops all three, the replicas
# draining first. Any setting in the environment reaches both replicas (README: Settings), e.g.
#
#   MODEL_ID=/models/faster-whisper-base deploy/run-local.sh
#   ADMISSION=fixed MAX_SESSIONS=256 MAX_PARTIAL_LAG_SECONDS=0 MODEL_ID=... deploy/run-local.sh   # for a capacity sweep
#
# The replicas start one after the other, so that each calibrates on a machine the other is not
# loading and no check sees both loading at once.
set -euo pipefail
cd "$(dirname "$0")/.."
cores=$(nproc)
export CPU_THREADS=${CPU_THREADS:-$(( cores > 1 ? cores / 2 : 1 ))}
haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)
pids=()
stop() {
    trap - EXIT INT TERM
    if [ ${#pids[@]} -gt 0 ]; then kill -TERM "${pids[@]}" 2>/dev/null || true; fi
    wait || true
}
trap stop EXIT INT TERM

ready() {  # until the replica on port $1 (process $2) answers /health with 200; fails if it ends first
    until python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "http://127.0.0.1:$1/health" 2>/dev/null; do
        kill -0 "$2" 2>/dev/null || { echo "the replica on port $1 ended before it was ready" >&2; return 1; }
        sleep 1
    done
}

for port in 8718 8719; do
    python -m uvicorn main:app --host 127.0.0.1 --port "$port" &
    pids+=($!)
    ready "$port" "$!"
done
"$haproxy" -db -f deploy/haproxy.cfg &
pids+=($!)
echo "replicas on 127.0.0.1:8718 and :8719 (CPU_THREADS=$CPU_THREADS each), HAProxy on ws://127.0.0.1:8716/ws" >&2
wait -n  # one of them ended: stop the others
