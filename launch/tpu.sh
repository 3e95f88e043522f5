#!/usr/bin/env bash
# Launch srum_jax on a Cloud TPU VM (or a queued resource) with gcloud.
#
#   launch/tpu.sh create|setup|run|logs|delete [--dry_run] -- <srum_jax subcommand and flags>
#
# Settings come from the environment:
#   TPU_NAME (srum), ZONE (us-central2-b), ACCELERATOR (v4-32), RUNTIME (tpu-ubuntu2204-base),
#   PROJECT (gcloud default), QUEUED=1 to use a queued resource, REPO_URL (git URL of this repo),
#   REPO_DIR (~/srum_jax; a leading ~/ expands on the host), JAX_VERSION (0.10.2),
#   WORKDIR: a shared workdir for every host, e.g. gs://my-bucket/srum/run1 (`run` adds
#   --config.workdir=$WORKDIR to a command with --config=...; gs:// goes through etils.epath + gcsfs, which
#   `setup` installs, so the hosts need no shared file system).
#
#   WORKDIR=gs://my-bucket/srum/run1 launch/tpu.sh run --dry_run -- run --config=experiments/bagel_7b_compbench.py
# Values travel into the remote command quoted (printf %q): spaces or shell characters stay part of the value.
# `run` executes the same CLI on every host (--worker=all); the program calls
# jax.distributed.initialize() itself when it sees more than one host.
set -euo pipefail

TPU_NAME=${TPU_NAME:-srum}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO_URL=${REPO_URL:-}
REPO_DIR=${REPO_DIR:-'~/srum_jax'}
WORKDIR=${WORKDIR:-}
JAX_VERSION=${JAX_VERSION:-0.10.2}
QUEUED=${QUEUED:-0}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

action=${1:-}
shift || true
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# $1 quoted for the remote shell; a leading ~/ is left unquoted so that it expands to the remote home.
q() {
  if [[ "$1" == "~/"* ]]; then printf '~/%q' "${1#\~/}"; else printf '%q' "$1"; fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

case "$action" in
  create)
    if [[ $QUEUED == 1 ]]; then
      run gcloud compute tpus queued-resources create "$TPU_NAME-qr" --node-id="$TPU_NAME" --zone="$ZONE" \
        $PROJECT_FLAG --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME"
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    fi
    ;;
  setup)
    [[ -n "$REPO_URL" || $DRY_RUN == 1 ]] || { echo "set REPO_URL to the git URL of this repository" >&2; exit 2; }
    dir=$(q "$REPO_DIR")
    ssh_all "git clone $(q "${REPO_URL:-REPO_URL}") $dir || (cd $dir && git pull); cd $dir && pip install -r requirements.txt && pip install -U $(q "jax[tpu]==$JAX_VERSION") gcsfs"
    ;;
  run)
    [[ $# -gt 0 ]] || { echo "usage: launch/tpu.sh run [--dry_run] -- <subcommand> --config=..." >&2; exit 2; }
    if [[ -n "$WORKDIR" && " $* " == *" --config="* ]]; then set -- "$@" "--config.workdir=$WORKDIR"; fi
    ssh_all "cd $(q "$REPO_DIR") && python -m srum_jax $(printf '%q ' "$@")2>&1 | tee -a srum_run.log"
    ;;
  logs)
    ssh_all "tail -n 100 $(q "$REPO_DIR")/srum_run.log"
    ;;
  delete)
    if [[ $QUEUED == 1 ]]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME-qr" --zone="$ZONE" $PROJECT_FLAG --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
    fi
    ;;
  *)
    echo "usage: launch/tpu.sh create|setup|run|logs|delete [--dry_run] [-- args]" >&2
    exit 2
    ;;
esac
