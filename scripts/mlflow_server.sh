#!/usr/bin/env bash
# MLflow tracking server for regft searches (on a cluster: the head node; cluster/aws.yaml runs it).
#
#   bash scripts/mlflow_server.sh                      # foreground, http://127.0.0.1:5000
#   bash scripts/mlflow_server.sh --background         # detached; log and pid in $MLFLOW_HOME
#   python -m regft.tune cars --tracking-uri http://127.0.0.1:5000 --storage s3://bucket/regft
#
# Runs and metrics: a sqlite file, $MLFLOW_HOME/mlflow.db (default ~/mlflow). Artifacts: each
# regft experiment is created with its artifact location under the search's --storage
# (<storage>/mlflow-artifacts/<experiment>), so on a cluster they land in S3 next to the
# datasets and checkpoints; the server reads them from there for the UI (with the node's
# credentials). --artifact-root (default $MLFLOW_HOME/artifacts) only serves experiments created
# elsewhere. Bound to 127.0.0.1 by default: reach it through SSH forwarding
# (`ray attach cluster/aws.yaml -p 5000`), never an open port. Env overrides: MLFLOW_HOME,
# MLFLOW_HOST, MLFLOW_PORT.
set -euo pipefail

home="${MLFLOW_HOME:-$HOME/mlflow}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
artifact_root=""
background=0
while [ $# -gt 0 ]; do
  case "$1" in
    --background) background=1 ;;
    --host) host="$2"; shift ;;
    --port) port="$2"; shift ;;
    --home) home="$2"; shift ;;
    --artifact-root) artifact_root="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$home"
home="$(cd "$home" && pwd)"  # sqlite URIs need an absolute path
artifact_root="${artifact_root:-$home/artifacts}"

cmd=(mlflow server --backend-store-uri "sqlite:///$home/mlflow.db"
     --default-artifact-root "$artifact_root" --host "$host" --port "$port")

if [ "$background" -eq 0 ]; then
  exec "${cmd[@]}"
fi
if [ -f "$home/server.pid" ] && kill -0 "$(cat "$home/server.pid")" 2>/dev/null; then
  echo "MLflow server already running (pid $(cat "$home/server.pid")) at http://$host:$port"
  exit 0
fi
# setsid + nohup: survives the SSH session of `ray up` that starts it
setsid nohup "${cmd[@]}" >"$home/server.log" 2>&1 < /dev/null &
echo $! >"$home/server.pid"
for _ in $(seq 1 120); do  # the first start creates the database (~20 s)
  if python - "$host" "$port" <<'EOF' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/health", timeout=2)
EOF
    echo "MLflow server up at http://$host:$port (pid $(cat "$home/server.pid"), log $home/server.log)"
    exit 0
  fi
  if ! kill -0 "$(cat "$home/server.pid")" 2>/dev/null; then
    echo "error: MLflow server exited; see $home/server.log" >&2
    tail -n 20 "$home/server.log" >&2
    exit 1
  fi
  sleep 1
done
echo "error: MLflow server not healthy after 120 s; see $home/server.log" >&2
exit 1
