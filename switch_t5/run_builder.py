"""Building a run: mesh, model, optimizer, train state, jitted steps, input pipelines; and a
checkpoint's model for decoding (`load_model`, what eval and infer run).

One path for everyone who needs the train step: `switch_t5.train` runs it, `switch_t5.plan`
compiles it abstractly for a pod, the benchmarks time it. So the planner's memory figure is the
figure of the step training runs.

    run = build_run(config, mesh, make_optimizer, losses, num_microbatches=2)
    state = run.setup.init_fn()
    state, metrics = run.train_step(state, batch)       # batch laid out by run.batch_shardings
    run.train_step.jitted.lower(run.setup.abstract_state, run.abstract_batch(256, lengths))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from switch_t5 import (
    distill,
    init_checkpoint,
    network,
    optim,
    partitioning,
    scan_utils,
    train_state,
    trainer,
)
from switch_t5.config import INFERENCE_FIELDS, SwitchConfig
from switch_t5.data import features

DEFAULT_COMPILATION_CACHE_DIR = os.path.join("~", ".cache", "switch_t5", "jax_cache")


def feature_length(key: str, lengths: Mapping[str, int]) -> int:
    """A batch feature's length: TASK_FEATURE_LENGTHS' inputs or targets entry."""
    return lengths[features.length_key(key)]


@dataclasses.dataclass
class Run:
    """A model, its train state setup and its jitted steps on one mesh.

    Attributes:
      config: the network config.
      mesh: the (data, expert, model) mesh.
      module: the `network.EncoderDecoder`.
      setup: `train_state.StateSetup` (abstract state, shardings, optimizer, init_fn).
      losses: the loss weights.
      batch_shardings: {feature: NamedSharding} of a global batch.
      num_microbatches: gradient-accumulation microbatches per step.
      teacher: distillation's frozen teacher (`distill.Teacher`), or None.
    """

    config: SwitchConfig
    mesh: jax.sharding.Mesh
    module: network.EncoderDecoder
    setup: train_state.StateSetup
    losses: trainer.LossConfig
    batch_shardings: dict[str, Any]
    num_microbatches: int
    teacher: distill.Teacher | None = None

    @functools.cached_property
    def train_step(self):
        """The jitted train step (`trainer.make_train_step`, or `distill.make_train_step` with a
        teacher; the state is donated). Built on first use, so a run refused at restore (a
        checkpoint of another model) builds none."""
        if self.teacher is not None:
            return distill.make_train_step(self, self.teacher)
        return trainer.make_train_step(
            self.module,
            self.setup.optimizer,
            self.losses,
            self.setup.shardings,
            self.batch_shardings,
            self.mesh,
            self.num_microbatches,
        )

    @functools.cached_property
    def eval_step(self):
        """The jitted eval step (no dropout, eval capacity factor)."""
        shardings = self.setup.shardings
        return trainer.make_eval_step(
            self.module,
            self.losses,
            shardings.params,
            self.batch_shardings,
            self.mesh,
            shardings.router_bias,
        )

    def abstract_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict[str, Any]:
        """{feature: ShapeDtypeStruct} of a global batch, with its shardings."""
        return {
            key: jax.ShapeDtypeStruct(
                (batch_size, feature_length(key, lengths)), np.int32, sharding=sharding
            )
            for key, sharding in self.batch_shardings.items()
        }

    def abstract_step_inputs(self, batch: Mapping[str, Any]) -> tuple[Any, ...]:
        """What `train_step.jitted` is lowered with: the abstract state, `batch` (from
        `abstract_batch`) and, with a teacher, its abstract params."""
        teacher = () if self.teacher is None else (self.teacher.abstract_params,)
        return (self.setup.abstract_state, batch, *teacher)

    def moe_layer_names(self, batch_size: int, lengths: Mapping[str, int]) -> list[str]:
        """The MoE layers' names, in the order the train step reports their metrics."""
        shapes = {
            k: jax.ShapeDtypeStruct((batch_size, feature_length(k, lengths)), np.int32)
            for k in self.batch_shardings
        }
        state = self.setup.abstract_state
        return trainer.moe_layer_names(self.module, state.params, shapes, state.router_bias)


def build_run(
    config: SwitchConfig,
    mesh: jax.sharding.Mesh,
    make_optimizer: Callable[[Any], optim.Optimizer],
    losses: trainer.LossConfig,
    *,
    seed: int = 0,
    num_microbatches: int = 1,
    batch_keys: Sequence[str] = features.FEATURE_KEYS,
    teacher: distill.Teacher | None = None,
) -> Run:
    """Builds the model, the abstract train state and the jitted train step on `mesh`.

    Args:
      config: the network config.
      mesh: from `partitioning.make_mesh` or `multihost.make_mesh_for_job`.
      make_optimizer: logical specs of the params -> `optim.Optimizer`
        (e.g. `optimizer_config.build`).
      losses: the loss weights (`trainer.LossConfig.for_model(config, ...)`).
      seed: RANDOM_SEED of the parameter init.
      num_microbatches: gradient accumulation per step.
      batch_keys: the batch's features (default: all the input pipeline yields).
      teacher: distill into this model from a frozen teacher (`distill.load_teacher`; abstract
        from `distill.abstract_teacher` for planning).
    """
    losses.check_resolved()
    config = partitioning.resolve_fsdp(config, mesh)
    setup = train_state.setup_train_state(
        lambda rng: network.init_variables(config, rng), make_optimizer, mesh, seed
    )
    module = network.EncoderDecoder(config)
    b_shardings = trainer.batch_shardings(dict.fromkeys(batch_keys), mesh)
    return Run(config, mesh, module, setup, losses, b_shardings, num_microbatches, teacher)


def decoding_model(config: SwitchConfig) -> tuple[network.EncoderDecoder, Callable[..., Any]]:
    """(module, converter) for decoding: the model as inference runs it
    (`SwitchConfig.for_inference`: each sequence its own routing group). The KV cache is per
    layer, so a scanned model decodes as its unscanned twin with converted params (a copy).
    `converter(params, router_bias=None)` gives the decoding params, carrying the train state's
    choice biases when there are some (`train_state.with_router_bias`)."""
    decoder = network.EncoderDecoder(dataclasses.replace(config.for_inference(), scan_layers=False))

    def convert(params, router_bias=None):
        if config.scan_layers:
            params = scan_utils.unscan_params(params, config)
            if router_bias is not None:
                router_bias = unscanned_router_bias(router_bias, config)
        return train_state.with_router_bias(params, router_bias)

    return decoder, convert


def unscanned_router_bias(router_bias: Mapping[str, Any], config: SwitchConfig) -> dict:
    """The "router_bias" collection of a scanned model in the unscanned layout:
    `stack/layers/subblock_j/...` [blocks, experts] -> `stack/layers_{b * period + j}/...`."""
    out: dict[str, Any] = {}
    for stack, tree in router_bias.items():
        period, layers = config.scan_period(stack), {}
        for sub, block in tree["layers"].items():
            j = int(sub.removeprefix("subblock_"))
            for b in range(jax.tree.leaves(block)[0].shape[0]):
                layers[f"layers_{b * period + j}"] = jax.tree.map(lambda x, b=b: x[b], block)
        out[stack] = layers
    return out


def input_pipeline(task, split, lengths, batch_size, seed, *, shuffle, pack, repeat):
    """The seqio-backed `data.pipeline.InputPipeline` of one split (imports TensorFlow)."""
    from switch_t5.data import pipeline as pipeline_lib

    return pipeline_lib.InputPipeline(
        task, split, lengths, batch_size, seed=seed, shuffle=shuffle, pack=pack, repeat=repeat
    )


def configure_compilation_cache(cache_dir: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache so restarts and reruns do not recompile.

    None: `~/.cache/switch_t5/jax_cache`, unless a cache dir is already configured (e.g. by the
    tests); "": leave it off.
    """
    current = jax.config.jax_compilation_cache_dir
    if cache_dir is None:
        if current:
            return current
        cache_dir = DEFAULT_COMPILATION_CACHE_DIR
    if cache_dir == "":
        return None
    cache_dir = os.path.expanduser(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return cache_dir


def load_model(
    ref: init_checkpoint.CheckpointRef,
    mesh_shape: tuple[int, int | None, int] = (-1, None, 1),
    vocabulary: Any | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, Any, SwitchConfig, Mesh]:
    """(model, params on the mesh, config, mesh) of a checkpoint (strict restore), the model
    configured for decoding: unscanned, each sequence its own MoE routing group.

    Args:
      ref: the checkpoint.
      mesh_shape: (data, expert, model) sizes for `partitioning.make_mesh`.
      vocabulary: when given, checked against the checkpoint's vocabulary record.
      overrides: SwitchConfig fields to change (the `switch_t5.SwitchConfig.*` bindings the
        command line gave, e.g. eval_capacity_factor).
    """
    if "model_config" not in ref.meta:
        raise init_checkpoint.InitialCheckpointError(
            f"{ref.step_dir}/meta has no model_config: not a checkpoint of this project"
        )
    # Decoding runs unscanned layers (the KV cache is per layer): a checkpoint of the scanned
    # layout is converted while it is read (`init_checkpoint.layout_view`). Each sequence is its
    # own routing group (`SwitchConfig.for_inference`) unless a gin binding says otherwise.
    saved = {**ref.meta["model_config"], **INFERENCE_FIELDS}
    from switch_t5.data import vocab as vocab_lib
    from switch_t5.interop import checkpoint_io

    config = checkpoint_io.config_from_dict(dict(saved)).with_fields(
        **{**(overrides or {}), "scan_layers": False}
    )
    if vocabulary is not None:
        init_checkpoint.check_vocabulary(ref, vocab_lib.vocabulary_record(vocabulary))
        vocab_lib.check_model_vocab_size(vocabulary, config.vocab_size, "the evaluated task")
    mesh = partitioning.make_mesh(*mesh_shape, num_experts=config.num_experts)
    boxed = network.init_abstract(config)["params"]
    shardings = partitioning.params_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    loaded = init_checkpoint.load_initial_params(str(ref.step_dir), abstract, strict=True)
    params = loaded.params
    if config.router_bias_update_rate > 0:
        saved_config = checkpoint_io.config_from_dict(dict(saved))
        bias = _read_router_bias(ref, saved_config, mesh)
        if saved_config.scan_layers:
            bias = unscanned_router_bias(bias, saved_config)
        params = train_state.with_router_bias(params, bias)
    return network.EncoderDecoder(config), params, config, mesh


def _read_router_bias(
    ref: init_checkpoint.CheckpointRef, saved_config: SwitchConfig, mesh: Mesh
) -> dict[str, Any]:
    """The checkpoint's choice biases (replicated on `mesh`), in its own layout; zeros when it
    has none (written with balancing off: the biases start at 0, as on resume)."""
    import orbax.checkpoint as ocp

    replicated = partitioning.replicated(mesh)
    wanted = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        nn.unbox(network.init_abstract(saved_config)[train_state.BIAS_FIELD]),
    )
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(ref.step_dir / "state")
    saved = getattr(saved, "item_metadata", saved)
    saved = getattr(saved, "tree", saved)
    if train_state.BIAS_FIELD not in saved:
        return jax.tree.map(
            lambda a: jax.device_put(np.zeros(a.shape, a.dtype), replicated), wanted
        )
    item = {train_state.BIAS_FIELD: wanted}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
    out = checkpointer.restore(
        ref.step_dir / "state",
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
    return out[train_state.BIAS_FIELD]
