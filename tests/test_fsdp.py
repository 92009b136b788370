"""FSDP (`SwitchConfig.fsdp`): the non-expert weights and their optimizer state sharded over the
batch axes too, with the same losses, smaller per-device bytes and unchanged expert shardings."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from test_trainer import _batch
from tiny import tiny_config, tiny_train_step

from switch_t5 import checkpoints

# Scanned layers (4 per stack, 2 scan steps of a dense+sparse pair), no dropout or jitter so that
# the two layouts compute the same function; capacity large enough that nothing drops.
CFG = tiny_config(
    num_encoder_layers=4,
    num_decoder_layers=4,
    moe_layer_interval=2,
    dropout_rate=0.0,
    router_jitter_noise=0.0,
    train_capacity_factor=4.0,
    group_size=8,
    scan_layers=True,
    logits_via_embedding=False,
)


def _setup(mesh, fsdp):
    run, batch = tiny_train_step(dataclasses.replace(CFG, fsdp=fsdp), mesh, _batch())
    return run.setup, run.train_step, batch


@pytest.fixture(scope="module")
def runs(mesh_222):
    out = {}
    for fsdp in (False, True):
        st, step, batch = _setup(mesh_222, fsdp)
        state = st.init_fn()
        losses = []
        for _ in range(5):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        out[fsdp] = (st, step, batch, state, losses)
    return out


def _is_expert(path) -> bool:
    return "expert" in jax.tree_util.keystr(path)


def _device_bytes(tree, keep) -> int:
    """Bytes one device holds of the leaves of `tree` whose path `keep` accepts."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if keep(path) and x.ndim >= 2:  # weights and their moments, not step counters
            shard = x.sharding.shard_shape(x.shape)
            total += int(np.prod(shard)) * x.dtype.itemsize
    return total


def test_fsdp_same_losses_fewer_bytes_expert_layout_unchanged(runs):
    losses_off, losses_on = runs[False][4], runs[True][4]
    np.testing.assert_allclose(losses_on, losses_off, rtol=1e-5, atol=1e-5)
    assert losses_on[-1] < losses_on[0]

    state_off, state_on = runs[False][3], runs[True][3]

    def non_expert(path):  # routers, norms and relative-position biases stay replicated
        where = jax.tree_util.keystr(path)
        return not any(k in where for k in ("expert", "router", "norm", "relpos"))

    for tree in ("params", "opt_state"):
        off = _device_bytes(getattr(state_off, tree), non_expert)
        on = _device_bytes(getattr(state_on, tree), non_expert)
        # data x expert = 4 on the (2, 2, 2) mesh (relative-position biases stay replicated).
        assert on * 4 == off, (tree, off, on)
    # Expert kernels keep their layout, params and optimizer state alike.
    for tree in ("params", "opt_state"):
        a = jax.tree_util.tree_flatten_with_path(getattr(state_off, tree))[0]
        b = jax.tree_util.tree_flatten_with_path(getattr(state_on, tree))[0]
        experts = [(p, x.sharding.spec, y.sharding.spec) for (p, x), (_, y) in zip(a, b)]
        experts = [e for e in experts if _is_expert(e[0]) and "router" not in str(e[0])]
        assert experts
        for path, off_spec, on_spec in experts:
            assert off_spec == on_spec, jax.tree_util.keystr(path)
    wi = state_on.params["encoder"]["layers"]["subblock_1"]["mlp"]["expert"]["wi"]["kernel"]
    assert wi.sharding.spec == PartitionSpec(None, "expert", None, "model")
    q = state_on.params["encoder"]["layers"]["subblock_0"]["attention"]["query"]["kernel"]
    assert q.sharding.spec == PartitionSpec(None, ("data", "expert"), "model")


def _gather_shapes(hlo_computation: str) -> list[str]:
    return re.findall(r"= (\w+\[[\d,]*\])[^=\n]*? all-gather(?:-start)?\(", hlo_computation)


def test_fsdp_gathers_one_layer_at_a_time_inside_the_scan(runs):
    st, step, batch, _, _ = runs[True]
    hlo = step.jitted.lower(st.abstract_state, batch).compile().as_text()
    # Computations are separated by blank lines and start with their name; scan bodies are the
    # `body=` of while instructions.
    computations = {c.split()[0]: c for c in hlo.split("\n\n") if c.strip()}
    computations = {k.removeprefix("ENTRY"): v for k, v in computations.items()}
    bodies = set(re.findall(r"body=([\w.%-]+)", hlo))
    assert bodies, "no scanned loop in the compiled step"
    in_loops = [g for b in bodies for g in _gather_shapes(computations.get(b, ""))]
    everywhere = _gather_shapes(hlo)
    # A query kernel [d_model 8, heads*head_dim 6] split over model: one layer's slice [8, 3] is
    # gathered inside the loop; the stacked [scan steps 2, 8, 3] never moves whole.
    assert "f32[8,3]" in in_loops, in_loops
    assert "f32[2,8,3]" not in everywhere, everywhere


def test_checkpoint_moves_from_replicated_to_fsdp_layout(runs, tmp_path):
    _, _, _, state_off, _ = runs[False]
    st_on = runs[True][0]
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    ckpt.save(5, state_off, {}, checkpoints.make_meta(dataclasses.replace(CFG, fsdp=False)))
    ckpt.close()
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    meta = checkpoints.make_meta(dataclasses.replace(CFG, fsdp=True))  # fsdp may change on resume
    restored = ckpt.restore(st_on.abstract_state, expected_meta=meta).state
    ckpt.close()
    assert checkpoints.tree_equal(restored, state_off)
    q = restored.params["encoder"]["layers"]["subblock_0"]["attention"]["query"]["kernel"]
    assert q.sharding.spec == PartitionSpec(None, ("data", "expert"), "model")
