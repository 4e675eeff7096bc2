#!/usr/bin/env bash
# Run the peer benchmark harness (../shared/bench) with pgjobs beside its peers, in one run
# on one server. The harness folder is read-only: copy it, add our adapter, run the copy.
#   bash tests/peerbench/run.sh                          # pgjobs and PgQueuer, 1 run
#   PEERS="pgjobs pgqueuer procrastinate" RUNS=3 bash tests/peerbench/run.sh
#   PY_pgjobs=/path/to/venv312/bin/python bash tests/peerbench/run.sh   # pgjobs on another Python
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$ROOT/../shared/bench}
export PB=${PB:-${TMPDIR:-/tmp}/peerbench}
COPY=$PB/harness
rm -rf "$COPY" && mkdir -p "$COPY"
cp "$SHARED_BENCH"/* "$COPY"/
cp "$HERE/pgjobs_adapter.py" "$COPY"/
export PY_pgjobs=${PY_pgjobs:-$ROOT/.venv/bin/python}
export PEERS=${PEERS:-"pgjobs pgqueuer"} RUNS=${RUNS:-1} AOF=${AOF:-0}
exec bash "$COPY/run_all.sh"
