"""Multi-host training on JAX's distributed runtime: 2 processes x 4 CPU devices with gloo.

The processes train a few steps on their own slices of each batch, save with orbax, and keep
training; a single process with 8 devices then restores the checkpoint (params bitwise equal to
those saved) and continues with the same losses. Run as a script, this file is the worker.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from switch_t5 import multihost

SAVE_AT, TOTAL_STEPS = 3, 5
BATCH, INPUTS_LENGTH, TARGETS_LENGTH = 8, 8, 8
FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


def _config():
    from tiny import tiny_config

    # Groups of 16 tokens: 4 groups per stack over the 4 batch shards.
    return tiny_config(group_size=16)


def _global_batch(step: int) -> dict[str, np.ndarray]:
    """The same global batch for every process layout: padded token rows from a seeded rng."""
    rng = np.random.default_rng(step)
    out = {}
    for key, length in zip(FEATURES, (INPUTS_LENGTH, TARGETS_LENGTH, TARGETS_LENGTH)):
        tokens = rng.integers(1, 128, size=(BATCH, length), dtype=np.int32)
        real = rng.integers(length // 2, length + 1, size=(BATCH, 1))
        out[key] = np.where(np.arange(length)[None] < real, tokens, 0).astype(np.int32)
    out["decoder_input_tokens"][:, 0] = 0
    return out


def _local_rows(sharding, shape) -> np.ndarray:
    """Row indices of the global batch held by this process's devices, in order."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.array(sorted(rows))


def _worker(role: str, model_dir: str, out_dir: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    from switch_t5 import checkpoints, network, optim, partitioning, train_state, trainer

    config = _config()
    if role == "train":
        assert multihost.initialize_from_env(), "the test sets JAX_COORDINATOR_ADDRESS etc."
        assert jax.process_count() == 2 and jax.local_device_count() == 4
        # data 2 across the processes (the "nodes"); expert and model inside each.
        mesh = multihost.make_mesh_for_job(-1, 2, 2, num_experts=config.num_experts)
    else:
        assert jax.process_count() == 1 and jax.device_count() == 8
        mesh = partitioning.make_mesh(2, 2, 2, num_experts=config.num_experts)
    report = {
        "mesh": dict(mesh.shape),
        "within_process": {
            a: multihost.axis_stays_within_granules(mesh, a) for a in ("data", "expert", "model")
        },
    }
    setup = train_state.setup_train_state(
        lambda rng: network.init_variables(config, rng),
        lambda specs: optim.make_optimizer("adafactor", optim.make_schedule("rsqrt"), specs),
        mesh,
        0,
    )
    module = network.EncoderDecoder(config)
    loss_config = trainer.LossConfig(1e-4, config.load_balancing_loss_weight, 0.0)
    b_shardings = trainer.batch_shardings(dict.fromkeys(FEATURES), mesh)
    step_fn = trainer.make_train_step(
        module, setup.optimizer, loss_config, setup.shardings, b_shardings, mesh
    )
    ckpt = checkpoints.Checkpointer(model_dir, max_to_keep=None, async_save=False)
    meta = checkpoints.make_meta(config)

    def batch(step):
        full = _global_batch(step)
        rows = _local_rows(b_shardings[FEATURES[0]], (BATCH, INPUTS_LENGTH))
        report.setdefault("local_rows", rows.tolist())
        return {
            k: jax.make_array_from_process_local_data(b_shardings[k], full[k][rows], full[k].shape)
            for k in FEATURES
        }

    def flat(params):
        return {
            jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        }

    losses = {}
    if role == "train":
        state, start = setup.init_fn(), 0
    else:
        restored = ckpt.restore(setup.abstract_state, SAVE_AT, expected_meta=meta)
        state, start = restored.state, SAVE_AT
        saved = np.load(os.path.join(out_dir, "params_at_save.npz"))
        got = flat(state.params)
        report["params_bitwise_equal"] = sorted(got) == sorted(saved.files) and all(
            np.array_equal(got[k], saved[k]) and got[k].dtype == saved[k].dtype for k in got
        )
    for step in range(start, TOTAL_STEPS):
        state, metrics = step_fn(state, batch(step))
        losses[step + 1] = float(metrics["loss"])
        if role == "train" and step + 1 == SAVE_AT:
            ckpt.save(SAVE_AT, state, {"step": SAVE_AT}, meta)
            ckpt.wait()
            params = flat(multihost_utils.process_allgather(state.params, tiled=True))
            if jax.process_index() == 0:
                np.savez(os.path.join(out_dir, "params_at_save.npz"), **params)
    report["losses"] = losses
    with open(os.path.join(out_dir, f"{role}_{jax.process_index()}.json"), "w") as f:
        json.dump(report, f)
    ckpt.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.update(
        PYTHONPATH=repo,
        JAX_PLATFORMS="cpu",
        # Tiny programs: skipping LLVM's optimisations halves the compile time; both runs
        # use the same flags, so their numbers stay comparable.
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        **extra,
    )
    return env


def _run(procs, timeout=600):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"worker failed (exit {p.returncode}):\n{out}\n{err[-6000:]}"


@pytest.mark.slow
def test_two_processes_train_save_and_one_process_resumes(tmp_path):
    model_dir, out_dir = str(tmp_path / "model"), str(tmp_path)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "train", model_dir, out_dir],
            env=_env(
                4,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
                SWITCH_T5_CPU_COLLECTIVES="gloo",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    _run(procs)
    _run(
        [
            subprocess.Popen(
                [sys.executable, __file__, "restore", model_dir, out_dir],
                env=_env(8),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        ]
    )
    reports = {}
    for name in ("train_0", "train_1", "restore_0"):
        with open(tmp_path / f"{name}.json") as f:
            reports[name] = json.load(f)
    # Each process fed its own half of every batch; the expert and model axes stayed inside
    # a process, only the data axis crossed between them.
    assert reports["train_0"]["local_rows"] == [0, 1, 2, 3]
    assert reports["train_1"]["local_rows"] == [4, 5, 6, 7]
    assert reports["train_0"]["within_process"] == {"data": False, "expert": True, "model": True}
    assert reports["train_0"]["losses"] == reports["train_1"]["losses"]
    restore = reports["restore_0"]
    assert restore["mesh"] == {"data": 2, "expert": 2, "model": 2}
    assert restore["params_bitwise_equal"] is True
    want = reports["train_0"]["losses"]
    assert sorted(restore["losses"]) == [str(s) for s in range(SAVE_AT + 1, TOTAL_STEPS + 1)]
    for step, loss in restore["losses"].items():
        assert loss == pytest.approx(want[step], rel=1e-5)
    # Training did something: the losses are not all the same.
    assert len({round(v, 6) for v in want.values()}) > 1


def test_environment_variables_are_all_or_nothing():
    assert multihost.distributed_args_from_env({}) is None
    env = {
        "JAX_COORDINATOR_ADDRESS": "node0:12345",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    assert multihost.distributed_args_from_env(env) == ("node0:12345", 4, 3)
    with pytest.raises(multihost.MultiHostConfigError, match="JAX_PROCESS_ID missing"):
        multihost.distributed_args_from_env({k: v for k, v in env.items() if "ID" not in k})
    with pytest.raises(multihost.MultiHostConfigError, match=r"must be in \[0, "):
        multihost.distributed_args_from_env({**env, "JAX_PROCESS_ID": "4"})
    with pytest.raises(multihost.MultiHostConfigError, match="needs a port"):
        multihost.distributed_args_from_env({**env, "JAX_COORDINATOR_ADDRESS": "node0"})
    with pytest.raises(multihost.MultiHostConfigError, match="must be integers"):
        multihost.distributed_args_from_env({**env, "JAX_NUM_PROCESSES": "four"})


def test_hybrid_mesh_checks_sizes(mesh_222):
    import jax

    with pytest.raises(ValueError, match="must multiply to 4"):
        multihost.make_hybrid_mesh((2, 2, 2), 2, devices=jax.devices())
    with pytest.raises(ValueError, match="does not divide num_experts=6"):
        multihost.make_hybrid_mesh((1, 4, 1), 2, num_experts=6, devices=jax.devices())
    # One process here: a single granule holds every axis.
    mesh = multihost.make_hybrid_mesh((2, 2, 2), 1, num_experts=4, devices=jax.devices())
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "model": 2}
    assert all(multihost.axis_stays_within_granules(mesh, a) for a in mesh.axis_names)
    mesh = multihost.make_mesh_for_job(-1, 2, 2, num_experts=4)
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "model": 2}


def test_per_slice_sizes_lay_expert_and_model_inside_a_slice():
    from switch_t5 import partitioning

    sizes = multihost.per_slice_sizes
    # 4 nodes of 8 devices: expert x model inside one, data = the rest of a node x 4 nodes.
    assert sizes(partitioning.MeshConfig(-1, 4, 2), 8, 4, num_experts=8) == (1, 4, 2)
    assert sizes(partitioning.MeshConfig(16, None, 1), 8, 4, num_experts=2) == (4, 2, 1)
    with pytest.raises(ValueError, match="does not fit inside one slice/node of 8"):
        sizes(partitioning.MeshConfig(-1, 4, 4), 8, 4)
    with pytest.raises(ValueError, match="data must be 8"):
        sizes(partitioning.MeshConfig(16, 2, 2), 8, 4)
    with pytest.raises(ValueError, match="only data may be -1"):
        sizes(partitioning.MeshConfig(2, 2, -1), 8, 4)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
