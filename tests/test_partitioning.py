"""The mesh builder, logical names on every param, and the sharded full model on a 2x2x2 mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from tiny import tiny_config

from switch_t5 import network, partitioning

RTOL, ATOL = 1e-5, 1e-6

# Every sharded dim divides its mesh axis (vocab 128, heads 2, heads * head_dim 6, mlp 16,
# experts 4), while the sizes stay distinct so that swapped axes fail. Capacity factor 1.0 with a
# floor of 1 slot and 6-token groups make tokens drop, so the test also checks that the sharded
# model drops the same ones.
CFG = tiny_config(
    moe_layer_interval=2,
    mlp_activations=("gelu", "linear"),
    logits_via_embedding=False,
    eval_capacity_factor=1.0,
    min_expert_capacity=1,
    group_size=6,
    dispatch="einsum",
)
RULE_NAMES = {name for name, _ in partitioning.LOGICAL_AXIS_RULES}


def test_mesh_sizes_must_multiply_to_the_device_count():
    with pytest.raises(ValueError, match="make the product equal 8"):
        partitioning.make_mesh(3, 1, 1)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        partitioning.make_mesh(-1, 3, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        partitioning.make_mesh(-1, -1, 2)
    with pytest.raises(ValueError, match="must be positive"):
        partitioning.make_mesh(0, 4, 2)


def test_expert_axis_must_divide_num_experts():
    with pytest.raises(ValueError, match="does not divide num_experts=6"):
        partitioning.make_mesh(2, 4, 1, num_experts=6)


def test_minus_one_takes_the_rest_and_expert_defaults_to_the_experts():
    assert dict(partitioning.make_mesh(-1, 2, 2).shape) == {"data": 2, "expert": 2, "model": 2}
    assert dict(partitioning.make_mesh(2, -1, 1).shape) == {"data": 2, "expert": 4, "model": 1}
    # expert=None: as many expert partitions as gcd(devices / model, num_experts).
    mesh = partitioning.make_mesh(num_experts=4)
    assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    assert dict(partitioning.make_mesh(num_experts=0).shape)["expert"] == 1
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_mesh_config_lists_every_problem_and_resolves():
    with pytest.raises(partitioning.MeshConfigError) as info:
        partitioning.MeshConfig(data=-1, expert=-1, model=0)
    assert "model=0 must be positive" in str(info.value)
    assert "at most one axis may be -1" in str(info.value)
    with pytest.raises(partitioning.MeshConfigError, match=r"expert=2\.0 must be an integer"):
        partitioning.MeshConfig(expert=2.0)
    assert partitioning.MeshConfig().resolve(8, num_experts=4) == (2, 4, 1)
    assert partitioning.MeshConfig(model=2).resolve(8, num_experts=8) == (1, 4, 2)
    with pytest.raises(partitioning.MeshConfigError, match="make the product equal 8"):
        partitioning.MeshConfig(data=2, expert=None).resolve(8)
    assert partitioning.MeshConfig(2, -1, 1).resolve(8) == (2, 4, 1)
    with pytest.raises(partitioning.MeshConfigError, match="does not divide num_experts=6"):
        partitioning.MeshConfig(2, 4, 1).resolve(8, num_experts=6)


def test_mesh_problems_of_per_sequence_routing_groups():
    """Per-sequence routing groups are the batch rows: they split wherever the rows do, whatever
    group_size says (the token-group rule would wrongly refuse this mesh)."""
    config = tiny_config(group_size=64, routing_groups="sequence", dispatch="einsum")
    mesh = {"data": 2, "expert": 2, "model": 1}
    lengths = {"inputs": 16, "targets": 8}
    assert partitioning.mesh_problems(config, mesh, 16, 1, lengths) == []
    tokens = dataclasses.replace(config, routing_groups="tokens")
    (problem,) = partitioning.mesh_problems(tokens, mesh, 16, 1, lengths)
    assert "decoder's 128 tokens per microbatch make 2 routing groups" in problem
    problems = partitioning.mesh_problems(config, mesh, 12, 2, lengths)
    assert problems == [
        "6 sequences per microbatch cannot be split over the data x expert = 2 x 2 = 4 batch "
        "shards; use a batch that is a multiple of 4 or smaller data/expert axes"
    ]


def _boxed_leaves(tree):
    return jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )[0]


@pytest.mark.parametrize(
    "config",
    [CFG, dataclasses.replace(CFG, num_experts=0, logits_via_embedding=True)],
    ids=["sparse_untied", "dense_tied"],
)
def test_every_param_has_logical_names_from_the_rules_table(config):
    abstract = network.init_abstract(config)
    leaves = _boxed_leaves(abstract["params"])
    assert leaves
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical names"
        names = leaf.names
        assert len(names) == leaf.value.ndim, f"{where}: {names} vs shape {leaf.value.shape}"
        assert set(names) <= RULE_NAMES, f"{where}: {set(names) - RULE_NAMES} not in the table"


@pytest.fixture(scope="module")
def variables():
    return nn.unbox(
        network.init_variables(CFG, jax.random.key(0), batch=4, inputs_length=6, targets_length=5)
    )


def _forward(variables, enc, dec, targets):
    logits, state = network.EncoderDecoder(CFG).apply(
        variables, enc, dec, targets, enable_dropout=False, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    dropped = [
        inter[stack]["layers_1"]["mlp"]["fraction_dropped"][0] for stack in ("encoder", "decoder")
    ]
    return logits, jnp.stack(dropped)


def test_sharded_forward_equals_unsharded(mesh_222, variables):
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(1, 128, (4, 6)), jnp.int32).at[1, 4:].set(0)
    dec = jnp.asarray(rng.integers(1, 128, (4, 5)), jnp.int32).at[:, 0].set(0)
    targets = jnp.asarray(rng.integers(1, 128, (4, 5)), jnp.int32).at[2, 3:].set(0)

    expected_logits, expected_dropped = jax.jit(_forward)(variables, enc, dec, targets)
    assert float(jnp.max(expected_dropped)) > 0.0, "the test needs dropped tokens"

    abstract = network.init_abstract(CFG, batch=4, inputs_length=6, targets_length=5)
    with jax.set_mesh(mesh_222), partitioning.axis_rules():
        param_shardings = partitioning.params_shardings(abstract, mesh_222)
        batch = partitioning.batch_sharding(mesh_222)
        logits_sharding = partitioning.logical_to_sharding(
            PartitionSpec("batch", "length", "vocab"), mesh_222
        )
        sharded_vars = jax.device_put(variables, param_shardings)
        forward = jax.jit(
            _forward,
            in_shardings=(param_shardings, batch, batch, batch),
            out_shardings=(logits_sharding, partitioning.replicated(mesh_222)),
        )
        logits, dropped = forward(sharded_vars, enc, dec, targets)

    kernel = sharded_vars["params"]["encoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("expert", None, "model")
    embedding = sharded_vars["params"]["token_embedder"]["embedding"]
    assert embedding.sharding.spec == PartitionSpec("model", None)
    assert logits.sharding == NamedSharding(
        mesh_222, PartitionSpec(("data", "expert"), None, "model")
    )
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(expected_dropped))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), RTOL, ATOL)
