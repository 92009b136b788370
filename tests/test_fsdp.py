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

from switch_t5 import checkpoints, partitioning
from switch_t5.interop import hf, streaming

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

    def non_expert(path):  # norms and relative-position biases stay replicated
        where = jax.tree_util.keystr(path)
        return "router" in where or not any(k in where for k in ("expert", "norm", "relpos"))

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
    router = state_on.params["encoder"]["layers"]["subblock_1"]["mlp"]["router"]["w"]["kernel"]
    assert router.sharding.spec == PartitionSpec(None, ("data", "expert"), None)


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


def _q_spec(state):
    return state.params["encoder"]["layers"]["subblock_0"]["attention"]["query"][
        "kernel"
    ].sharding.spec


def _save(path, state, config, fsdp):
    ckpt = checkpoints.Checkpointer(str(path))
    ckpt.save(5, state, {}, checkpoints.make_meta(dataclasses.replace(config, fsdp=fsdp)))
    ckpt.close()


def _exported(model_dir, hf_dir) -> dict:
    hf.orbax_to_hf(str(model_dir), str(hf_dir), tokenizer=False)
    src = streaming.SafetensorsSource(str(hf_dir))
    return {n: src.read(n, ()) for n in src.names()}


@pytest.mark.parametrize("saved_fsdp", [False, True])
def test_checkpoint_moves_between_layouts(runs, tmp_path, saved_fsdp):
    state = runs[saved_fsdp][3]
    _save(tmp_path, state, CFG, saved_fsdp)
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    meta = checkpoints.make_meta(dataclasses.replace(CFG, fsdp=not saved_fsdp))  # may change
    restored = ckpt.restore(runs[not saved_fsdp][0].abstract_state, expected_meta=meta).state
    ckpt.close()
    assert checkpoints.tree_equal(restored, state)
    fsdp_spec = PartitionSpec(None, ("data", "expert"), "model")
    assert _q_spec(state) == (fsdp_spec if saved_fsdp else PartitionSpec(None, None, "model"))
    assert _q_spec(restored) == (PartitionSpec(None, None, "model") if saved_fsdp else fsdp_spec)


def test_hf_export_reads_either_layout_alike(mesh_222, tmp_path):
    """HF export reads the arrays, not their layout (unscanned: what HF export takes)."""
    cfg = dataclasses.replace(CFG, scan_layers=False)
    exported = []
    for fsdp in (False, True):
        run, _ = tiny_train_step(dataclasses.replace(cfg, fsdp=fsdp), mesh_222, _batch())
        state = run.setup.init_fn()
        emb = state.params["token_embedder"]["embedding"]
        assert emb.sharding.spec == PartitionSpec("model", ("data", "expert") if fsdp else None)
        _save(tmp_path / str(fsdp), state, cfg, fsdp)
        exported.append(_exported(tmp_path / str(fsdp), tmp_path / f"hf_{fsdp}"))
    a, b = exported
    assert sorted(a) == sorted(b) and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_fsdp_axes_go_where_the_shape_allows():
    """jax shards evenly only: Switch-C's d_model 2080 does not split over 2048 batch shards."""
    fit = partitioning.fit_fsdp
    c_mesh = {"data": 1, "expert": 2048, "model": 1}
    fsdp = ("data", "expert")
    # Attention: neither 2080 nor 1920 divides 2048, the stacked layers axis is never used.
    logical = PartitionSpec("layers", "weight_embed", "joined_kv")
    spec = fit(logical, PartitionSpec(None, fsdp, "model"), (2048, 2080, 1920), c_mesh)
    assert spec == PartitionSpec(None, None, "model")
    # The router's experts dim takes the batch shards instead.
    logical = PartitionSpec("layers", "weight_embed", "unmodeled")
    spec = fit(logical, PartitionSpec(None, fsdp, None), (15, 2080, 2048), c_mesh)
    assert spec == PartitionSpec(None, None, fsdp)
    # Divisible: unchanged. Else the larger single batch axis that divides d_model.
    logical = PartitionSpec("weight_embed", "mlp")
    sizes = {"data": 2, "expert": 4, "model": 2}
    assert fit(logical, PartitionSpec(fsdp, "model"), (16, 6), sizes) == PartitionSpec(
        fsdp, "model"
    )
    assert fit(logical, PartitionSpec(fsdp, "model"), (12, 6), sizes) == PartitionSpec(
        "expert", "model"
    )
    assert fit(logical, PartitionSpec(fsdp, "model"), (6, 6), sizes) == PartitionSpec(
        "data", "model"
    )


def test_fsdp_state_builds_when_d_model_does_not_split_over_the_batch_shards(mesh_222):
    cfg = dataclasses.replace(CFG, d_model=6, fsdp=True)  # 6 rows over 2 x 2 batch shards
    run, _ = tiny_train_step(cfg, mesh_222, _batch())
    q = run.setup.abstract_state.params["encoder"]["layers"]["subblock_0"]["attention"]
    assert q["query"]["kernel"].sharding.spec == PartitionSpec(None, "data", "model")


def test_fsdp_turns_itself_on_for_large_models_or_large_meshes():
    base = tiny_config(  # Switch-Base sizes: 0.17B non-expert params
        vocab_size=32128, d_model=768, num_heads=12, head_dim=64, d_ff=3072,
        num_encoder_layers=12, num_decoder_layers=12, num_experts=128,
    )  # fmt: skip
    assert 0.1e9 < partitioning.non_expert_params(base) < 0.5e9
    on_128 = {"data": 1, "expert": 128, "model": 1}
    on_256 = {"data": 2, "expert": 128, "model": 2}
    assert not partitioning.fsdp_enabled(base) and not partitioning.fsdp_enabled(base, on_128)
    assert partitioning.fsdp_enabled(base, on_256)
    assert not partitioning.fsdp_enabled(dataclasses.replace(base, fsdp=False), on_256)
    assert not partitioning.fsdp_enabled(CFG, on_256)  # tiny models never
    large = dataclasses.replace(base, d_model=2048, num_heads=32)
    assert partitioning.non_expert_params(large) >= 0.5e9 and partitioning.fsdp_enabled(large)


def test_fsdp_counts_the_weights_that_stay_whole(mesh_222):
    """d_model 5 divides into no batch axis: only the routers (4 experts) split; the planner
    reports the rest as whole."""
    cfg = dataclasses.replace(CFG, d_model=5, fsdp=True)
    st = tiny_train_step(cfg, mesh_222, _batch())[0].setup
    whole = partitioning.fsdp_whole_params(
        st.logical_specs, st.shardings.params, st.abstract_state.params
    )
    # embedding 128 x 5, untied logits 5 x 128, 12 attention kernels of 5 x 6 per stack pair
    # layer (4 encoder x 4 + 4 decoder x 8 kernels), 4 dense MLPs (wi 5 x 16, wo 16 x 5).
    assert whole == 640 + 640 + (16 + 32) * 30 + 4 * 160
    router = st.abstract_state.params["encoder"]["layers"]["subblock_1"]["mlp"]["router"]
    assert router["w"]["kernel"].sharding.spec == PartitionSpec(None, None, ("data", "expert"))


def test_fsdp_splits_over_two_dims_when_no_single_dim_takes_the_batch_shards():
    """Switch-C on 2048 devices: attention `[15, 2080, 1920]` and the embeddings split over two
    dims (2080 / 32 x 1920 / 64) on a (rows, cols) view of the batch shards."""
    split = partitioning.split_fsdp
    c_mesh = {"data": 1, "expert": 2048, "model": 1}
    fsdp = ("data", "expert")
    logical = PartitionSpec("layers", "weight_embed", "joined_kv")
    assert split(logical, PartitionSpec(None, fsdp, "model"), (15, 2080, 1920), c_mesh) == (
        32,
        PartitionSpec(None, "fsdp_rows", "fsdp_cols"),
    )
    logical = PartitionSpec("vocab", "weight_embed")
    assert split(logical, PartitionSpec("model", fsdp), (32128, 2080), c_mesh) == (
        32,
        PartitionSpec("fsdp_cols", "fsdp_rows"),
    )
    # A single dim that takes all shards wins (the router's experts); non-FSDP weights never.
    logical = PartitionSpec("layers", "weight_embed", "unmodeled")
    assert split(logical, PartitionSpec(None, fsdp, None), (15, 2080, 2048), c_mesh) is None
    logical = PartitionSpec("layers", "expert", "embed", "mlp")
    assert (
        split(logical, PartitionSpec(None, "expert", None, "model"), (15, 2048, 2080, 6144), c_mesh)
        is None
    )
    # No pair fits 4 x 2048 = 8192 shards (2080 x 1920 hold 2^5 x 2^7 = 4096 at most): then
    # fit_fsdp's single-axis fallback.
    two = {"data": 4, "expert": 2048, "model": 1}
    logical = PartitionSpec("layers", "weight_embed", "joined_kv")
    assert split(logical, PartitionSpec(None, fsdp, "model"), (15, 2080, 1920), two) is None


def test_fsdp_two_dim_split_same_losses_bytes_and_checkpoints(tmp_path):
    """d_model 6 and heads x head_dim 4 over 2 x 4 batch shards: the attention kernels and
    routers split 2 x 4 over two dims, same losses as without FSDP, 8x fewer bytes per device;
    checkpoints move between the layouts bit-exactly."""
    mesh = partitioning.make_mesh(2, 4, 1, num_experts=4)
    cfg = dataclasses.replace(CFG, d_model=6, head_dim=2)
    states, losses, setups = {}, {}, {}
    for fsdp in (False, True):
        run, batch = tiny_train_step(dataclasses.replace(cfg, fsdp=fsdp), mesh, _batch())
        setups[fsdp] = run.setup
        state = run.setup.init_fn()
        losses[fsdp] = []
        for _ in range(3):
            state, metrics = run.train_step(state, batch)
            losses[fsdp].append(float(metrics["loss"]))
        states[fsdp] = state
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5, atol=1e-5)
    layer = states[True].params["encoder"]["layers"]
    q = layer["subblock_0"]["attention"]["query"]["kernel"]
    router = layer["subblock_1"]["mlp"]["router"]["w"]["kernel"]
    for w in (q, router):
        assert w.sharding.spec == PartitionSpec(None, "fsdp_rows", "fsdp_cols")
        assert dict(w.sharding.mesh.shape) == {"fsdp_rows": 2, "fsdp_cols": 4, "model": 1}
        assert w.sharding.shard_shape(w.shape) == (w.shape[0], 3, 1)

    def attention(path):  # the kernels (relative-position biases stay replicated)
        where = jax.tree_util.keystr(path)
        return "attention" in where and "kernel" in where

    for tree in ("params", "opt_state"):
        off = _device_bytes(getattr(states[False], tree), attention)
        on = _device_bytes(getattr(states[True], tree), attention)
        assert on * 8 == off, (tree, off, on)
    for saved in (False, True):
        _save(tmp_path / str(saved), states[saved], cfg, saved)
        ckpt = checkpoints.Checkpointer(str(tmp_path / str(saved)))
        meta = checkpoints.make_meta(dataclasses.replace(cfg, fsdp=not saved))
        restored = ckpt.restore(setups[not saved].abstract_state, expected_meta=meta).state
        ckpt.close()
        assert checkpoints.tree_equal(restored, states[saved])
        assert _q_spec(restored) == _q_spec(states[not saved])
