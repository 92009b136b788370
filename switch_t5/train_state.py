"""TrainState (params, optimizer state, step, rng) and its sharded initialisation.

Shardings are explicit: the params' come from their logical axis names through the ONE rules
table (`partitioning.LOGICAL_AXIS_RULES`), the optimizer state's are derived from the params'
(`optim.Optimizer.state_shardings`), step and rng are replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from switch_t5 import optim, partitioning

_FIELDS = ("step", "params", "opt_state", "rng")
BIAS_FIELD = "router_bias"


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training run needs to continue exactly.

    A pytree keyed by attribute name (as a flax struct). `router_bias` is a node of the tree only
    when set, so a state without it has exactly the tree of the checkpoints written before it
    existed, and those restore unchanged.

    Attributes:
      step: <int32>[] optimizer steps taken.
      params: the model parameters (unboxed), float32.
      opt_state: the optimizer state.
      rng: <uint32>[2] base key; step s uses fold_in(rng, s), so it never has to advance.
      router_bias: the "router_bias" variable collection (auxiliary-loss-free balancing: each
        MoE layer's <float32>[experts] choice bias, moved by the train step outside the
        optimizer, `routing.update_choice_bias`); None when the model has none.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    router_bias: Any = None

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    def tree_flatten_with_keys(self):
        names = _FIELDS + ((BIAS_FIELD,) if self.router_bias is not None else ())
        children = [(jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in names]
        return children, self.router_bias is not None

    @classmethod
    def tree_unflatten(cls, has_bias: bool, children) -> TrainState:
        return cls(*children) if has_bias else cls(*children, router_bias=None)

    def variables(self) -> dict[str, Any]:
        """The model's flax variables: {"params": ...} and the choice biases when set."""
        return model_variables(self.params, self.router_bias)

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


def model_variables(params: Any, router_bias: Any = None) -> dict[str, Any]:
    """{"params": params}, plus the "router_bias" collection when there is one: `router_bias`,
    or the one `params` carries (`with_router_bias`)."""
    if router_bias is None and isinstance(params, Mapping) and BIAS_FIELD in params:
        params = dict(params)
        router_bias = params.pop(BIAS_FIELD)
    if router_bias is None:
        return {"params": params}
    return {"params": params, BIAS_FIELD: router_bias}


def with_router_bias(params: Any, router_bias: Any) -> Any:
    """The params of a decoding model with the state's choice biases riding along under
    `BIAS_FIELD` (no module of the network has that name), so that decoding, which takes one
    params tree, routes as training did; `model_variables` splits them off again."""
    if router_bias is None:
        return params
    return {**params, BIAS_FIELD: router_bias}


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
        # The biases are [experts] vectors (or [layers, experts] when scanned): replicated.
        router_bias=jax.tree.map(lambda _: replicated, abstract_vars.get(BIAS_FIELD)),
    )

    def init() -> TrainState:
        variables = init_variables(init_key)
        params = nn.unbox(variables["params"])
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            opt_state=optimizer.tx.init(params),
            rng=train_key,
            router_bias=nn.unbox(variables.get(BIAS_FIELD)),
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
