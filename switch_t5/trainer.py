"""The pure train step and eval step, and the loss; the loop lives in `switch_t5.train`.

Loss (T5X + Switch Transformer):

  loss = sum_t w_t * CE_t / sum_t w_t            cross-entropy over the real target tokens
       + z_loss * sum_t w_t * lse_t^2 / sum_t w_t  output-logit z-loss (T5X, 1e-4)
       + alpha * load_balancing_loss             arXiv 2101.03961 eq. 4, averaged over MoE layers
       + beta * router_z_loss                    ST-MoE (arXiv 2202.08906) eq. 5

where lse_t = logsumexp of the logits at target position t and w_t the loss weight (1 for real
target tokens, 0 for padding). With gradient accumulation every microbatch's token sums are
divided by the token count of the WHOLE batch, so the accumulated gradient of these terms equals
the full-batch gradient (up to summation order). The MoE losses are computed per microbatch and
averaged (as T5X does): they are not linear in the tokens (products of per-expert fractions over
the valid tokens), so with accumulation they differ slightly from the full-batch values.

The MoE losses and metrics the steps return, and how microbatches and eval batches reduce them,
are declared once in `switch_t5.moe_metrics`.

Shape legend: b = batch, l = target length, v = vocabulary, n = microbatches, L = MoE layers,
e = experts.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from switch_t5 import errors, moe_metrics, optim, partitioning, routing, train_state
from switch_t5 import moe as moe_lib
from switch_t5.data import features as features_lib
from switch_t5.train_state import TrainState

Batch = Mapping[str, jax.Array]

# The metric of the pure token cross-entropy (no z-loss, no router losses): the number that
# compares models whose auxiliary losses differ (dense vs Switch).
CROSS_ENTROPY = "cross_entropy"
# The aux key under which an objective returns further sums over target tokens ({name: sum});
# the train step reports each as the metric `name`, divided by the batch's token weight.
PER_TOKEN_SUMS = "per_token_sums"
# Model inputs among the T5X EncDec features (the rest, e.g. decoder_loss_weights, feed the loss).
MODEL_FEATURES = features_lib.MODEL_FEATURES


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms: the one place the train and eval steps read them.

    The router weights belong to the model as well (a converted Hugging Face model carries its
    `router_aux_loss_coef`), so None takes the model config's value (`for_model`).

    Attributes:
      z_loss: output-logit z-loss coefficient (T5X default 1e-4; gin `train.z_loss`).
      load_balancing_loss_weight: alpha of the load-balancing loss (arXiv 2101.03961 eq. 4);
        None = SwitchConfig.load_balancing_loss_weight.
      router_z_loss_weight: beta of the router z-loss (ST-MoE, arXiv 2202.08906 eq. 5); None =
        SwitchConfig.router_z_loss_weight.
      sequence_balance_loss_weight: alpha of DeepSeek-V3's sequence-wise balance loss; None =
        SwitchConfig.sequence_balance_loss_weight (the model computes the loss only when that
        is > 0).
    """

    z_loss: float = 1e-4
    load_balancing_loss_weight: float | None = None
    router_z_loss_weight: float | None = None
    sequence_balance_loss_weight: float | None = None

    def __post_init__(self):
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name != "z_loss":
                continue
            if not errors.is_number(value) or value < 0:
                problems.append(f"{f.name}={value!r} must be a number >= 0")
        if problems:
            raise errors.UserError("bad loss weights: " + "; ".join(problems))

    def for_model(self, config: Any) -> LossConfig:
        """The weights with the router ones the model config gives where left None."""
        return dataclasses.replace(
            self,
            load_balancing_loss_weight=_first_set(
                self.load_balancing_loss_weight, config.load_balancing_loss_weight
            ),
            router_z_loss_weight=_first_set(self.router_z_loss_weight, config.router_z_loss_weight),
            sequence_balance_loss_weight=_sequence_balance_weight(self, config),
        )

    def check_resolved(self) -> None:
        if self.load_balancing_loss_weight is None or self.router_z_loss_weight is None:
            raise ValueError("LossConfig: router weights unset; use loss_config.for_model(config)")


def _first_set(value: float | None, default: float) -> float:
    return default if value is None else value


def _sequence_balance_weight(losses: LossConfig, config: Any) -> float:
    model_weight = getattr(config, "sequence_balance_loss_weight", 0.0)
    weight = _first_set(losses.sequence_balance_loss_weight, model_weight)
    if weight > 0 and not model_weight > 0:
        raise errors.UserError(
            f"sequence_balance_loss_weight={weight} but the model computes no sequence-wise "
            "balance loss: set switch_t5.SwitchConfig.sequence_balance_loss_weight > 0 instead"
        )
    return weight


def loss_weights(batch: Batch) -> jax.Array:
    """<float32>[b, l]: `decoder_loss_weights` if present, else 1 on non-padding targets."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def token_losses(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float
) -> dict[str, jax.Array]:
    """Sums over tokens of the cross-entropy, z-loss and correct predictions.

    Args:
      logits: <float>[b, l, v].
      targets: <int32>[b, l].
      weights: <float32>[b, l].
      z_loss: output-logit z-loss coefficient.

    Returns:
      cross_entropy_sum, z_loss_sum, correct_sum, weight_sum: <float32>[] each.
    """
    # Softmax statistics in float32 even for bfloat16 activations (selective precision,
    # arXiv 2101.03961 sec. 2.4).
    logits = logits.astype(jnp.float32)
    # [b, l, v] -> [b, l]
    lse = jax.nn.logsumexp(logits, axis=-1)
    # [b, l, v] -> [b, l]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "cross_entropy_sum": jnp.sum((lse - target_logit) * weights),
        "z_loss_sum": jnp.sum(z_loss * jnp.square(lse) * weights),
        "correct_sum": jnp.sum(correct * weights),
        "weight_sum": jnp.sum(weights),
    }


def apply_model(
    module: nn.Module,
    params: Any,
    batch: Batch,
    *,
    enable_dropout: bool,
    rng: jax.Array | None = None,
    router_bias: Any = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Runs the model; returns (<float32>[b, l, v] logits, MoE losses/metrics).

    Args:
      module: the EncoderDecoder.
      params: its params (unboxed).
      batch: T5X EncDec features.
      enable_dropout: training mode (dropout, router jitter, train capacity factor).
      rng: key for the "dropout" and "jitter" streams (training only).
      router_bias: the "router_bias" collection (auxiliary-loss-free balancing), or None. In
        training the MoE layers' pre-capacity loads come back under `routing.LOAD_COLLECTION`.
    """
    features = {k: batch[k] for k in MODEL_FEATURES if k in batch}
    rngs = None
    if enable_dropout:
        dropout_rng, jitter_rng = jax.random.split(rng)
        rngs = {"dropout": dropout_rng, "jitter": jitter_rng}
    sow_load = enable_dropout and router_bias is not None
    logits, variables = module.apply(
        train_state.model_variables(params, router_bias),
        **features,
        enable_dropout=enable_dropout,
        rngs=rngs,
        mutable=["intermediates", routing.LOAD_COLLECTION] if sow_load else ["intermediates"],
    )
    moe = moe_lib.collect_moe_intermediates(variables.get("intermediates", {}))
    moe.pop("layer_names")
    if sow_load:
        moe[routing.LOAD_COLLECTION] = variables[routing.LOAD_COLLECTION]
    return logits, moe


def moe_layer_names(
    module: nn.Module, abstract_params: Any, batch: Batch, router_bias: Any = None
) -> list[str]:
    """Names of the MoE layers in the order of `expert_usage` rows (traced, never run)."""
    names: list[str] = []

    def run(params, batch, router_bias):
        features = {k: batch[k] for k in MODEL_FEATURES if k in batch}
        _, variables = module.apply(
            train_state.model_variables(params, router_bias),
            **features,
            enable_dropout=False,
            mutable=["intermediates"],
        )
        names.extend(
            moe_lib.collect_moe_intermediates(variables.get("intermediates", {}))["layer_names"]
        )
        return 0

    jax.eval_shape(run, abstract_params, batch, router_bias)
    return names


def _objective(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    total_weight: jax.Array,
    num_microbatches: int,
    module: nn.Module,
    loss_config: LossConfig,
    router_bias: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One microbatch's share of the full-batch loss, and its metric sums."""
    logits, moe = apply_model(
        module, params, batch, enable_dropout=True, rng=rng, router_bias=router_bias
    )
    sums = token_losses(
        logits, batch["decoder_target_tokens"], loss_weights(batch), loss_config.z_loss
    )
    aux = moe_aux_loss(moe, loss_config)
    loss = (sums["cross_entropy_sum"] + sums["z_loss_sum"]) / total_weight + aux / num_microbatches
    return loss, {**sums, **{k: v for k, v in moe.items()}}


def moe_aux_loss(moe: Mapping[str, Any], loss_config: LossConfig, batches: int = 1) -> Any:
    """The weighted sum of the MoE auxiliary losses in `moe` (0 when there are none).

    Each loss is a metric whose `moe_metrics.MoeMetric.loss_weight` names its LossConfig field
    (alpha * load_balancing_loss + beta * router_z_loss for the built-in routers).

    Args:
      moe: MoE losses by name: one batch's, or sums over `batches` eval batches.
      loss_config: the weights.
      batches: the batches summed in `moe` (each "mean" loss is divided by it).
    """
    terms = []
    for m in moe_metrics.present(moe):
        if m.loss_weight is not None:
            weight = getattr(loss_config, m.loss_weight)
            if weight is None:
                raise ValueError(f"LossConfig.{m.loss_weight} unset; use loss_config.for_model")
            term = weight * moe[m.name]
            terms.append(term / batches if batches != 1 and m.over_steps == "mean" else term)
    return functools.reduce(operator.add, terms) if terms else 0.0


def _split_microbatches(batch: Batch, n: int) -> Batch:
    """[b, ...] -> [n, b / n, ...]; microbatch i takes examples i, i + n, ... so that every
    microbatch spreads over all the batch shards."""

    def split(x):
        b = x.shape[0]
        # [b, ...] -> [b / n, n, ...] -> [n, b / n, ...]
        return jnp.swapaxes(x.reshape((b // n, n, *x.shape[1:])), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def _with_updated_router_bias(state: TrainState, aux: dict[str, Any], rate: float) -> TrainState:
    """Auxiliary-loss-free balancing: the choice biases move outside the optimizer, by the load
    of the global batch (summed over the microbatches); a state without biases is returned as
    it is."""
    if state.router_bias is None:
        return state
    new_bias = jax.tree.map(
        lambda b, load: routing.update_choice_bias(b, load, rate),
        state.router_bias,
        aux[routing.LOAD_COLLECTION],
    )
    return state.replace(router_bias=new_bias)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    module: nn.Module,
    optimizer: optim.Optimizer,
    loss_config: LossConfig,
    num_microbatches: int = 1,
    objective: Callable[..., tuple[jax.Array, dict[str, Any]]] = _objective,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` (pure; jit it with `make_train_step`).

    `objective(params, batch, rng, total_weight, num_microbatches, module, loss_config,
    router_bias)` gives one microbatch's share of the loss and its sums (`_objective`;
    distillation's adds the teacher's soft targets, `switch_t5.distill`).

    Returns:
      The new state and metrics (<float32>[] scalars; expert_usage <float32>[L, e]).
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    total_weight = jnp.maximum(jnp.sum(loss_weights(batch)), 1.0)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    objective_args = (total_weight, num_microbatches, module, loss_config, state.router_bias)

    if num_microbatches == 1:
        (loss, aux), grads = grad_fn(state.params, batch, step_rng, *objective_args)
    else:
        micro = _split_microbatches(batch, num_microbatches)

        def body(carry, xs):
            grads_acc, loss_acc, aux_acc = carry
            i, mb = xs
            (loss_i, aux_i), grads_i = grad_fn(
                state.params, mb, jax.random.fold_in(step_rng, i), *objective_args
            )
            return (
                jax.tree.map(jnp.add, grads_acc, grads_i),
                loss_acc + loss_i,
                jax.tree.map(jnp.add, aux_acc, aux_i),
            ), None

        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        first_mb = jax.tree.map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(
            lambda: grad_fn(state.params, first_mb, step_rng, *objective_args)[0][1]
        )
        zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
        (grads, loss, aux), _ = jax.lax.scan(
            body,
            (zero_grads, jnp.zeros((), jnp.float32), zero_aux),
            (jnp.arange(num_microbatches), micro),
        )
        for metric in moe_metrics.present(aux):
            aux[metric.name] = moe_metrics.reduce_steps(metric, aux[metric.name], num_microbatches)

    new_state = _with_updated_router_bias(
        state.apply_gradients(grads, optimizer.tx), aux, module.config.router_bias_update_rate
    )
    params_finite = jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params)])
    )
    metrics = {
        "loss": loss,
        CROSS_ENTROPY: aux["cross_entropy_sum"] / total_weight,
        "z_loss": aux["z_loss_sum"] / total_weight,
        # Percent, the unit of every accuracy the project reports (T5's metrics included).
        "accuracy": 100.0 * aux["correct_sum"] / total_weight,
        **{k: v / total_weight for k, v in aux.get(PER_TOKEN_SUMS, {}).items()},
        **{m.name: aux[m.name] for m in moe_metrics.present(aux, "train")},
        "learning_rate": optimizer.schedule(state.step),
        "grad_norm": optax.global_norm(grads),
        "target_tokens": aux["weight_sum"],
        "params_finite": params_finite,
    }
    return new_state, metrics


def eval_step(
    params: Any,
    batch: Batch,
    router_bias: Any = None,
    *,
    module: nn.Module,
    loss_config: LossConfig,
) -> dict[str, jax.Array]:
    """Metric sums of one eval batch (no dropout, eval capacity factor); see `EvalAccumulator`.
    `router_bias`: the state's choice biases (auxiliary-loss-free balancing), or None."""
    logits, moe = apply_model(module, params, batch, enable_dropout=False, router_bias=router_bias)
    sums = token_losses(
        logits, batch["decoder_target_tokens"], loss_weights(batch), loss_config.z_loss
    )
    return {**sums, **{m.name: moe[m.name] for m in moe_metrics.present(moe, "eval")}}


class EvalAccumulator:
    """Adds eval-batch sums on the host; `result()` gives the eval metrics over all batches."""

    def __init__(self, loss_config: LossConfig):
        loss_config.check_resolved()
        self.loss_config = loss_config
        self.sums: dict[str, Any] = {}
        self.batches = 0

    def add(self, out: Mapping[str, Any]) -> None:
        out = jax.device_get(out)
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.batches += 1

    def result(self) -> dict[str, Any]:
        if not self.batches:
            raise ValueError("evaluation saw no batches: the validation split is empty")
        s, n = self.sums, self.batches
        w = max(float(s["weight_sum"]), 1.0)
        moe = {}
        for metric in moe_metrics.present(s, "eval"):
            value = moe_metrics.reduce_steps(metric, s[metric.name], n)
            moe[metric.name] = float(value) if np.ndim(value) == 0 else value
        aux = moe_aux_loss(s, self.loss_config, n)
        return {
            "loss": float((s["cross_entropy_sum"] + s["z_loss_sum"]) / w + aux),
            CROSS_ENTROPY: float(s["cross_entropy_sum"] / w),
            "z_loss": float(s["z_loss_sum"] / w),
            "accuracy": float(100.0 * s["correct_sum"] / w),  # percent, as train_step
            **moe,
            "target_tokens": float(s["weight_sum"]),
            "batches": n,
        }


def batch_shardings(batch_spec: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Every [batch, length] feature sharded over ("data", "expert") on its batch axis."""
    sharding = partitioning.batch_sharding(mesh)
    return {k: sharding for k in batch_spec}


def make_train_step(
    module: nn.Module,
    optimizer: optim.Optimizer,
    loss_config: LossConfig,
    state_shardings: TrainState,
    batch_shardings: Mapping[str, Any],
    mesh: jax.sharding.Mesh,
    num_microbatches: int = 1,
):
    """The jitted train step with explicit in/out shardings (the state is donated)."""
    loss_config.check_resolved()
    fn = functools.partial(
        train_step,
        module=module,
        optimizer=optimizer,
        loss_config=loss_config,
        num_microbatches=num_microbatches,
    )
    replicated = partitioning.replicated(mesh)
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, dict(batch_shardings)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    def step(state, batch):
        with jax.set_mesh(mesh), partitioning.axis_rules():
            return jitted(state, batch)

    step.jitted = jitted
    return step


def make_eval_step(
    module: nn.Module,
    loss_config: LossConfig,
    param_shardings: Any,
    batch_shardings: Mapping[str, Any],
    mesh: jax.sharding.Mesh,
    bias_shardings: Any = None,
):
    """The jitted eval step with explicit in/out shardings: `step(params, batch, router_bias)`
    (router_bias laid out by `bias_shardings`; None for a model without choice biases)."""
    loss_config.check_resolved()
    fn = functools.partial(eval_step, module=module, loss_config=loss_config)
    jitted = jax.jit(
        fn,
        in_shardings=(param_shardings, dict(batch_shardings), bias_shardings),
        out_shardings=partitioning.replicated(mesh),
    )

    def step(params, batch, router_bias=None):
        with jax.set_mesh(mesh), partitioning.axis_rules():
            return jitted(params, batch, router_bias)

    step.jitted = jitted
    return step
