"""Dry runs of the pod and cluster launchers: the commands they would run."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(script, *args, **env):
    full_env = {**os.environ, "DRY_RUN": "1", **env}
    return subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_tpu_pod_run_trains_on_every_worker():
    out = _dry_run("launch_tpu_pod.sh", "run", "--gin.TRAIN_STEPS=10", MODEL_DIR="gs://b/run1")
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip())
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert "--worker=all" in argv
    remote = next(a for a in argv if a.startswith("--command="))[len("--command=") :]
    remote_argv = shlex.split(remote)
    assert remote_argv[remote_argv.index("-m") + 1] == "switch_t5.train"
    assert "--gin_file=configs/models/switch_base_128.gin" in remote_argv
    assert "--gin_file=configs/runs/pretrain.gin" in remote_argv
    assert '--gin.MODEL_DIR="gs://b/run1"' in remote_argv
    assert "--gin.TRAIN_STEPS=10" in remote_argv


def test_tpu_pod_sweep_one_run_per_expert_count():
    out = _dry_run("launch_tpu_pod.sh", "sweep", "8", "32", MODEL_DIR="gs://b/sweep")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    for n, line in zip((8, 32), lines):
        assert f"--gin.NUM_EXPERTS={n}" in line
        assert f"gs://b/sweep/experts_{n}" in line


def test_tpu_pod_lifecycle_commands():
    create = _dry_run("launch_tpu_pod.sh", "create", ACCELERATOR_TYPE="v5p-256")
    assert create.returncode == 0
    assert "tpu-vm create switch-t5-pod" in create.stdout
    assert "--accelerator-type=v5p-256" in create.stdout
    delete = _dry_run("launch_tpu_pod.sh", "delete")
    assert "tpu-vm delete switch-t5-pod" in delete.stdout


def test_tpu_pod_needs_model_dir():
    env = {k: v for k, v in os.environ.items() if k != "MODEL_DIR"}
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "launch_tpu_pod.sh"), "run"],
        env={**env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert "set MODEL_DIR" in out.stderr


@pytest.mark.parametrize("nodes", ["2", "16"])
def test_slurm_batch_script(nodes):
    out = _dry_run(
        "launch_slurm_gpu.sh", "run", "--gin.BATCH_SIZE=512", MODEL_DIR="/shared/r1", NODES=nodes
    )
    assert out.returncode == 0, out.stderr
    script = out.stdout
    assert f"#SBATCH --nodes={nodes}" in script
    assert "#SBATCH --ntasks-per-node=1" in script
    assert "export JAX_COORDINATOR_ADDRESS=" in script
    assert "export JAX_NUM_PROCESSES=$SLURM_NNODES" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    inner = shlex.split(srun)[-1]  # the bash -c command each task runs
    inner_argv = shlex.split(inner)
    assert inner_argv[0] == "JAX_PROCESS_ID=$SLURM_PROCID"
    assert inner_argv[inner_argv.index("-m") + 1] == "switch_t5.train"
    assert '--gin.MODEL_DIR="/shared/r1"' in inner_argv
    assert "--gin.BATCH_SIZE=512" in inner_argv


def test_slurm_sweep_one_job_per_expert_count():
    out = _dry_run("launch_slurm_gpu.sh", "sweep", "8", "64", MODEL_DIR="/shared/sweep")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("#SBATCH --nodes=") == 2
    assert "--gin.NUM_EXPERTS=8" in out.stdout and "/shared/sweep/experts_64" in out.stdout
