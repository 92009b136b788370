"""TrainState (params, optimizer state, step, rng) and its sharded initialisation.

Shardings are explicit: the params' come from their logical axis names through the ONE rules
table (`partitioning.LOGICAL_AXIS_RULES`), the optimizer state's are derived from the params'
(`optim.Optimizer.state_shardings`), step and rng are replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from switch_t5 import optim, partitioning


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue exactly.

    Attributes:
      step: <int32>[] optimizer steps taken.
      params: the model parameters (unboxed), float32.
      opt_state: the optimizer state.
      rng: <uint32>[2] base key; step s uses fold_in(rng, s), so it never has to advance.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    def apply_gradients(self, grads: Any, tx: optax.GradientTransformation) -> TrainState:
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class StateSetup:
    """The abstract state, its shardings and the optimizer, before anything is allocated.

    Attributes:
      abstract_state: TrainState of ShapeDtypeStructs carrying their shardings.
      shardings: TrainState of NamedShardings.
      logical_specs: logical PartitionSpecs of the params.
      optimizer: the optimizer built for these params.
      init_fn: () -> TrainState, jitted with `shardings` as out_shardings.
    """

    abstract_state: TrainState
    shardings: TrainState
    logical_specs: Any
    optimizer: optim.Optimizer
    init_fn: Callable[[], TrainState]


def setup_train_state(
    init_variables: Callable[[jax.Array], Any],
    make_optimizer: Callable[[Any], optim.Optimizer],
    mesh: Mesh,
    seed: int,
) -> StateSetup:
    """Plans the sharded TrainState without allocating it.

    Args:
      init_variables: rng -> boxed flax variables (with "params"); called only under
        `jax.eval_shape` and inside the jitted init.
      make_optimizer: logical specs of the params -> Optimizer.
      mesh: the (data, expert, model) mesh.
      seed: random seed; params are initialised from PRNGKey(seed), the training rng from a
        key folded from it.
    """
    key = jax.random.PRNGKey(seed)
    init_key, train_key = jax.random.split(key)
    abstract_vars = jax.eval_shape(init_variables, init_key)
    if "params" not in abstract_vars:
        raise ValueError(f"init_variables returned {list(abstract_vars)}; it must return 'params'")
    boxed_params = abstract_vars["params"]
    logical_specs = nn.get_partition_spec(boxed_params)
    abstract_params = nn.unbox(boxed_params)
    param_shardings = partitioning.logical_to_sharding(logical_specs, mesh, abstract_params)
    optimizer = make_optimizer(logical_specs)
    replicated = partitioning.replicated(mesh)
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=optimizer.state_shardings(param_shardings, abstract_params),
        rng=replicated,
    )

    def init() -> TrainState:
        params = nn.unbox(init_variables(init_key)["params"])
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            opt_state=optimizer.tx.init(params),
            rng=train_key,
        )

    with jax.set_mesh(mesh), partitioning.axis_rules():
        abstract = jax.eval_shape(init)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    jitted = jax.jit(init, out_shardings=shardings)

    def init_fn() -> TrainState:
        with jax.set_mesh(mesh), partitioning.axis_rules():
            return jitted()

    return StateSetup(abstract_state, shardings, logical_specs, optimizer, init_fn)
