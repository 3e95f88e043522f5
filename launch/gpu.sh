#!/usr/bin/env bash
# Launch srum_jax on local GPUs with jax[cuda]: one process per host, multi-node via a coordinator.
#
#   launch/gpu.sh [--dry_run] [--setup] -- <srum_jax subcommand and flags>
#
# Multi-node: set on every node NUM_PROCESSES (hosts), PROCESS_ID (0..N-1) and COORDINATOR
# (host:port of process 0). The program reads them (SRUM_COORDINATOR, SRUM_NUM_PROCESSES,
# SRUM_PROCESS_ID) and calls jax.distributed.initialize(). One process drives all local GPUs.
set -euo pipefail

DRY_RUN=0
SETUP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry_run) DRY_RUN=1; shift ;;
    --setup) SETUP=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: launch/gpu.sh [--dry_run] [--setup] -- <subcommand> --config=..." >&2; exit 2; }

JAX_VERSION=${JAX_VERSION:-0.10.2}
NUM_PROCESSES=${NUM_PROCESSES:-1}
PROCESS_ID=${PROCESS_ID:-0}
COORDINATOR=${COORDINATOR:-}
if [[ $NUM_PROCESSES -gt 1 && -z "$COORDINATOR" ]]; then
  echo "multi-node needs COORDINATOR=host:port (process 0)" >&2
  exit 2
fi

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ $SETUP == 1 ]]; then
  run pip install -r requirements.txt
  run pip install -U "jax[cuda13]==$JAX_VERSION"
fi

run env XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}" \
  SRUM_COORDINATOR="$COORDINATOR" SRUM_NUM_PROCESSES="$NUM_PROCESSES" SRUM_PROCESS_ID="$PROCESS_ID" \
  python -m srum_jax "$@"
