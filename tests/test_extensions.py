"""The four extension points, used together from outside switch_t5/: a router, an MoE metric, a
task and an optimizer registered by this test module train 2 steps through `switch_t5.train`
(the gin-configurable entry point users run) with no edit of the library.

docs/architecture.md walks through the same four additions.
"""

import json
import os
import sys

import gin
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import tiny_config

from switch_t5 import gin_utils, init_checkpoint, moe_metrics, optim, routing
from switch_t5 import train as train_lib
from switch_t5.config import pad_vocab_size
from switch_t5.data import vocab as vocab_lib

ROUTER = "test_round_robin"
METRIC = "test_router_calls"
OPTIMIZER = "test_sgd"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def round_robin_router(config):
    """Token t of a group goes to expert t mod E, in the next free slot of that expert; tokens
    past the capacity are dropped. Weight 1, no losses. Reports METRIC = 1 per MoE call."""

    def run(logits, valid, call):
        g, t, e = logits.shape
        # [t] -> [g, t]: expert and slot of each token, by its position in the group.
        expert = jnp.broadcast_to(jnp.arange(t) % e, (g, t))
        position = jnp.broadcast_to(jnp.arange(t) // e, (g, t))
        kept = valid & (position < call.capacity)
        plan = routing.DispatchPlan(
            expert=expert[..., None],
            position=jnp.minimum(position, call.capacity - 1)[..., None],
            weight=jnp.ones((g, t, 1), jnp.float32),
            kept=kept[..., None],
            capacity=call.capacity,
            num_experts=e,
        )
        dropped = 1.0 - jnp.sum(kept) / jnp.maximum(jnp.sum(valid), 1)
        return routing.RouterOutput(
            plan, {}, {METRIC: jnp.ones((), jnp.float32), "fraction_dropped": dropped}
        )

    return run


def build_sgd(config, schedule, logical_specs):
    """Plain SGD on the configured schedule; its state mirrors the params."""
    BUILT.append(config.name)
    tx = optax.sgd(schedule)
    return optim.Optimizer(config.name, tx, schedule, optim.optax_state_shardings(tx))


BUILT: list[str] = []


@pytest.fixture
def extensions(tmp_path):
    """Registers the router, the metric, the optimizer and (by its module) the task; a run gin
    file with the task's `import` line and its data macros."""
    sys.modules.pop("toy_task", None)
    import toy_task

    moe_metrics.register(moe_metrics.MoeMetric(METRIC, description="MoE calls (always 1)"))
    routing.register_router(ROUTER, round_robin_router)
    optim.register_optimizer(OPTIMIZER, build_sgd)
    task, cleanup_task = toy_task.register()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, rng.integers(3, 6))) for _ in range(40)]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    spm = vocab_lib.train_sentencepiece(
        [f"reverse: {line}" for line in lines] * 5, str(tmp_path / "spm.model"), vocab_size=132
    )
    gin_file = tmp_path / "run.gin"
    gin_file.write_text(
        "import toy_task\n"
        f"MIXTURE_OR_TASK_NAME = '{task}'\n"
        f"TOY_FILES = '{tmp_path / 'lines.txt'}'\n"
        f"VOCABULARY_PATH = '{spm}'\n"
        "switch_t5.data_gin.register_tasks.mixture_or_task_name = %MIXTURE_OR_TASK_NAME\n"
    )
    gin.clear_config()
    yield task, str(gin_file)
    gin.clear_config()
    cleanup_task()
    optim.unregister_optimizer(OPTIMIZER)
    routing.unregister_router(ROUTER)
    moe_metrics.unregister(METRIC)


def test_a_router_metric_task_and_optimizer_from_tests_train_two_steps(extensions, tmp_path):
    task, gin_file = extensions
    gin_utils.parse_gin([gin_file])
    config = tiny_config(
        router_type=ROUTER,
        vocab_size=pad_vocab_size(132),
        dropout_rate=0.0,
        train_capacity_factor=2.0,
        group_size=8,
    )
    model_dir = tmp_path / "run"
    result = train_lib.train(
        model_dir=str(model_dir),
        train_steps=2,
        mixture_or_task_name=task,
        task_feature_lengths={"inputs": 16, "targets": 8},
        batch_size=8,
        log_every=1,
        eval_period=0,
        make_plots=False,
        mesh_data=2,
        mesh_expert=2,
        mesh_model=2,
        optimizer=OPTIMIZER,
        lr_schedule="constant",
        base_learning_rate=0.1,
        model_config=config,
    )
    assert result.step == 2 and BUILT[-1] == OPTIMIZER
    with open(model_dir / "metrics.jsonl") as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        assert np.isfinite(record["loss"])
        assert record[METRIC] == 1.0  # the mean over MoE layers of a 1 per call
        assert record["learning_rate"] == pytest.approx(0.1)
        assert "load_balancing_loss" not in record  # the toy router computes none
    ref = init_checkpoint.find_checkpoint(str(model_dir))
    assert ref.step == 2 and ref.meta["task"]["name"] == task
    assert ref.meta["task"]["data"]["TOY_FILES"] == str(tmp_path / "lines.txt")
    assert ref.meta["model_config"]["router_type"] == ROUTER
    with open(os.path.join(model_dir, "config.gin")) as f:
        text = f.read()
    assert text.startswith("import toy_task")  # eval and infer rebuild the task from it
    assert f"name='{OPTIMIZER}'" in text
