#!/usr/bin/env bash
# Launch a switch_t5 training job on a Cloud TPU VM pod slice (one process per TPU VM host).
#
# Usage:
#   scripts/launch_tpu_pod.sh create              # create the TPU VM slice
#   scripts/launch_tpu_pod.sh setup               # clone + install switch_t5 on every worker
#   scripts/launch_tpu_pod.sh run [TRAIN FLAGS]   # run python -m switch_t5.train on every worker
#   scripts/launch_tpu_pod.sh sweep N1 N2 ...     # one run per expert count (NUM_EXPERTS), in turn
#   scripts/launch_tpu_pod.sh delete              # tear the slice down
#
# Settings (environment variables):
#   TPU_NAME (switch-t5-pod), ZONE (us-central2-b), ACCELERATOR_TYPE (v4-128),
#   RUNTIME_VERSION (tpu-ubuntu2204-base), PROJECT (gcloud's default when unset),
#   REPO_URL (https://github.com/switch-t5/switch_t5.git), REPO_REF (main),
#   MODEL_DIR (gs://YOUR_BUCKET/switch_t5/$TPU_NAME, required for run/sweep),
#   GIN_FILES (model + run gin files, space separated),
#   DRY_RUN=1 prints the gcloud commands instead of running them.
#
# Example: pretrain Switch-Base-128 on C4 on a v4-128 slice
#   MODEL_DIR=gs://my-bucket/switch_base_128 scripts/launch_tpu_pod.sh run \
#     --gin.TRAIN_STEPS=500000
# Example: expert-count sweep (one job per value, MODEL_DIR gets a /experts_N suffix)
#   MODEL_DIR=gs://my-bucket/sweep scripts/launch_tpu_pod.sh sweep 8 32 128
#
# On TPU VMs jax.distributed.initialize() discovers the coordinator and process ids itself, so
# no coordinator flags are passed; every worker runs the same command (--worker=all).
set -euo pipefail

TPU_NAME=${TPU_NAME:-switch-t5-pod}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-128}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REPO_URL=${REPO_URL:-https://github.com/switch-t5/switch_t5.git}
REPO_REF=${REPO_REF:-main}
GIN_FILES=${GIN_FILES:-"configs/models/switch_base_128.gin configs/runs/pretrain.gin"}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command="$1"
}

train_command() {
  local model_dir=$1
  shift
  local cmd="cd ~/switch_t5 && .venv/bin/python -m switch_t5.train"
  local f
  for f in $GIN_FILES; do cmd+=" --gin_file=$f"; done
  cmd+=" --gin.MODEL_DIR=\\\"$model_dir\\\""
  local arg
  for arg in "$@"; do cmd+=" $(printf '%q' "$arg")"; done
  printf '%s' "$cmd"
}

require_model_dir() {
  if [[ -z "${MODEL_DIR:-}" ]]; then
    echo "error: set MODEL_DIR (e.g. MODEL_DIR=gs://YOUR_BUCKET/switch_t5/run1): TPU hosts" \
      "must write checkpoints to a shared gs:// bucket" >&2
    exit 2
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;
  setup)
    on_all_workers "git clone --branch $REPO_REF $REPO_URL ~/switch_t5 || (cd ~/switch_t5 && git pull); cd ~/switch_t5 && python3.11 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    require_model_dir
    on_all_workers "$(train_command "$MODEL_DIR" "$@")"
    ;;
  sweep)
    require_model_dir
    if [[ $# -eq 0 ]]; then
      echo "error: sweep needs expert counts, e.g. sweep 8 32 128" >&2
      exit 2
    fi
    for n in "$@"; do
      on_all_workers "$(train_command "$MODEL_DIR/experts_$n" "--gin.NUM_EXPERTS=$n")"
    done
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    echo "usage: $0 {create|setup|run [FLAGS]|sweep N...|delete} (see the header for settings)" >&2
    exit 2
    ;;
esac
