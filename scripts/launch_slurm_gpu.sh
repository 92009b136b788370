#!/usr/bin/env bash
# Launch a switch_t5 training job on a SLURM GPU cluster: one process per node, all its GPUs.
#
# Usage (from a login node, inside the repository):
#   scripts/launch_slurm_gpu.sh run [TRAIN FLAGS]   # sbatch one multi-node job
#   scripts/launch_slurm_gpu.sh sweep N1 N2 ...     # one job per expert count (NUM_EXPERTS)
#
# Settings (environment variables):
#   NODES (4), GPUS_PER_NODE (8), PARTITION (gpu), TIME (72:00:00), ACCOUNT (unset),
#   JOB_NAME (switch_t5), PYTHON (.venv/bin/python), COORDINATOR_PORT (12345),
#   MODEL_DIR (a path every node sees, or gs://; required),
#   GIN_FILES (model + run gin files, space separated),
#   DRY_RUN=1 prints the generated sbatch script instead of submitting it.
#
# Each process calls jax.distributed.initialize() with the coordinator address, process count
# and process id set below from SLURM's variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
# JAX_PROCESS_ID; switch_t5.train reads them); the mesh then spans NODES x GPUS_PER_NODE GPUs
# with the expert axis kept inside a node (NVLink) by mesh_utils.create_hybrid_device_mesh.
#
# Example: pretrain Switch-Base-128 on 4 nodes x 8 GPUs
#   MODEL_DIR=/shared/runs/switch_base_128 scripts/launch_slurm_gpu.sh run --gin.TRAIN_STEPS=500000
# Example: expert-count sweep
#   MODEL_DIR=/shared/runs/sweep scripts/launch_slurm_gpu.sh sweep 8 32 128
set -euo pipefail

NODES=${NODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PARTITION=${PARTITION:-gpu}
TIME=${TIME:-72:00:00}
JOB_NAME=${JOB_NAME:-switch_t5}
PYTHON=${PYTHON:-.venv/bin/python}
COORDINATOR_PORT=${COORDINATOR_PORT:-12345}
GIN_FILES=${GIN_FILES:-"configs/models/switch_base_128.gin configs/runs/pretrain.gin"}

if [[ -z "${MODEL_DIR:-}" ]]; then
  echo "error: set MODEL_DIR to a directory all nodes share (or a gs:// URL)" >&2
  exit 2
fi

# Writes the batch script for one job to stdout.
batch_script() {
  local model_dir=$1
  shift
  local flags=""
  local f arg
  for f in $GIN_FILES; do flags+=" --gin_file=$f"; done
  flags+=" --gin.MODEL_DIR=\\\"$model_dir\\\""
  for arg in "$@"; do flags+=" $(printf '%q' "$arg")"; done
  cat <<SCRIPT
#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --partition=$PARTITION
#SBATCH --time=$TIME
${ACCOUNT:+#SBATCH --account=$ACCOUNT}
set -euo pipefail
export JAX_COORDINATOR_ADDRESS=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1):$COORDINATOR_PORT
export JAX_NUM_PROCESSES=\$SLURM_NNODES
# XLA would otherwise preallocate 75% of each GPU at start.
export XLA_PYTHON_CLIENT_MEM_FRACTION=\${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --kill-on-bad-exit=1 bash -c 'JAX_PROCESS_ID=\$SLURM_PROCID exec $PYTHON -m switch_t5.train$flags'
SCRIPT
}

submit() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "# sbatch <<'EOF'"
    cat
    echo "# EOF"
  else
    sbatch
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  run)
    batch_script "$MODEL_DIR" "$@" | submit
    ;;
  sweep)
    if [[ $# -eq 0 ]]; then
      echo "error: sweep needs expert counts, e.g. sweep 8 32 128" >&2
      exit 2
    fi
    for n in "$@"; do
      batch_script "$MODEL_DIR/experts_$n" "--gin.NUM_EXPERTS=$n" | submit
    done
    ;;
  *)
    echo "usage: $0 {run [FLAGS]|sweep N...} (see the header for settings)" >&2
    exit 2
    ;;
esac
