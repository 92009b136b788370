"""Distilling a (sparse) teacher into a dense student (arXiv 2101.03961 sec. 4.2, Tables 6-8).

The teacher is any checkpoint of this project (trained, converted or fine-tuned); its
architecture comes from the checkpoint's recorded model config. It runs frozen inside the
student's jitted train step: its params are a separate input of the step (on their own
shardings on the student's mesh), never differentiated (`stop_gradient`), never given to the
optimizer and never donated. Its routing is the eval routing: no dropout, no jitter, the eval
capacity factor.

Loss of the student, per real target token t (weights w_t as `trainer.loss_weights`):

  loss = (1 - alpha) * CE(y_t, student_t)                      the ground truth
       + alpha * T^2 * CE(softmax(teacher_t / T), softmax(student_t / T))   the soft targets
       + the usual z-loss and router losses of the student

with alpha = `DISTILLATION_ALPHA` (the paper's best: 0.25) and T the softmax temperature (the
paper uses 1; T^2 keeps the soft gradients' scale as T changes, Hinton et al. 2015). alpha = 0
is exactly the plain loss (the soft term is not even added). The train metrics add
`distillation_cross_entropy` (the soft-target CE at T) and `teacher_cross_entropy` (the
teacher's CE on the ground truth, the quality the student distils).

Student initialisation (Table 6), for a run that starts neither from a checkpoint in MODEL_DIR
nor from an initial checkpoint: every student param with a teacher param of the same name and
shape is copied (embeddings, attention, norms, relative position biases, the dense layers'
MLPs); the MLP of a layer that is sparse in the teacher (`.../mlp/wi/kernel` in the student,
`.../mlp/expert/wi/kernel` [experts, ...] in the teacher) is set by `student_mlp_init`:
"random" (fresh, as in the paper), "expert_0" (the teacher's first expert) or "mean" (the mean
of the experts). The teacher's routers are not used.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from switch_t5 import errors, init_checkpoint, network, partitioning, scan_utils, trainer
from switch_t5.config import SwitchConfig
from switch_t5.train_state import TrainState

STUDENT_MLP_INITS = ("random", "expert_0", "mean")
# The train metrics the distillation objective adds (per target token, like cross_entropy).
SOFT_CROSS_ENTROPY = "distillation_cross_entropy"
TEACHER_CROSS_ENTROPY = "teacher_cross_entropy"
# A student MLP param of a layer that is sparse in the teacher: `<layer>/mlp/<rest>` in the
# student reads `<layer>/mlp/expert/<rest>` of the teacher.
_MLP = re.compile(r"^(.*/mlp)/(.+)$")


class DistillationError(errors.UserError):
    """The teacher cannot teach this student (vocabulary, architecture, settings)."""


@dataclasses.dataclass(frozen=True)
class DistillationConfig:
    """A run's teacher (gin `train.<field>`; configs/experiments/distill_quickstart.gin).

    Attributes:
      teacher_checkpoint_path: TEACHER_CHECKPOINT_PATH: a MODEL_DIR, its checkpoints/ folder or
        one step's folder; None = no distillation.
      teacher_step: the teacher's step; None = latest (or the one the path names).
      distillation_alpha: DISTILLATION_ALPHA, the weight of the teacher's soft targets (the
        ground truth gets 1 - alpha); arXiv 2101.03961 Table 6's best is 0.25.
      distillation_temperature: the softmax temperature of the soft targets (the paper: 1).
      student_mlp_init: the MLP of the layers that are sparse in the teacher: "random",
        "expert_0" or "mean" (module docstring).
    """

    teacher_checkpoint_path: str | None = None
    teacher_step: int | None = None
    distillation_alpha: float = 0.25
    distillation_temperature: float = 1.0
    student_mlp_init: str = "random"

    def __post_init__(self):
        problems = []
        path = self.teacher_checkpoint_path
        if path is not None and (not isinstance(path, str) or not path):
            problems.append(f"teacher_checkpoint_path={path!r} must be a checkpoint folder")
        a = self.distillation_alpha
        if not errors.is_number(a) or not 0 <= a <= 1:
            problems.append(f"distillation_alpha={a!r} must be a number in [0, 1]")
        temp = self.distillation_temperature
        if not errors.is_number(temp) or temp <= 0:
            problems.append(f"distillation_temperature={temp!r} must be a number > 0")
        if self.student_mlp_init not in STUDENT_MLP_INITS:
            problems.append(
                f"student_mlp_init={self.student_mlp_init!r} must be one of {STUDENT_MLP_INITS}"
            )
        if self.teacher_step is not None and not errors.is_int(self.teacher_step):
            problems.append(f"teacher_step={self.teacher_step!r} must be an integer or None")
        if problems:
            raise DistillationError("bad distillation settings: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.teacher_checkpoint_path is not None


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """A teacher checkpoint found and checked, before its params are read.

    Attributes:
      settings: the distillation settings.
      ref: the teacher's checkpoint step.
      config: its recorded model config.
    """

    settings: DistillationConfig
    ref: init_checkpoint.CheckpointRef
    config: SwitchConfig


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher on a mesh.

    Attributes:
      spec: what it is.
      module: its `network.EncoderDecoder`.
      abstract_params: ShapeDtypeStructs with its shardings (the train step's third input).
      shardings: its params' NamedShardings.
      params: the params on `shardings`; None for planning (abstract only).
    """

    spec: TeacherSpec
    module: network.EncoderDecoder
    abstract_params: Any
    shardings: Any
    params: Any = None


def resolve_teacher(
    settings: DistillationConfig,
    student: SwitchConfig,
    vocabulary: Mapping[str, Any] | None = None,
) -> TeacherSpec | None:
    """The teacher's checkpoint and config, checked against the student (None: no teacher).

    Args:
      settings: the distillation settings.
      student: the student's model config.
      vocabulary: the run's vocabulary record ({"path", "hash"}); None = not checked.

    Raises:
      DistillationError: no checkpoint there, or teacher and student do not share the
        vocabulary (one message naming both).
    """
    if not settings.enabled:
        return None
    path = settings.teacher_checkpoint_path
    ref = init_checkpoint.find_checkpoint(path, settings.teacher_step)
    if ref is None or not ref.meta.get("model_config"):
        what = "holds no complete checkpoint" if ref is None else "records no model config"
        raise DistillationError(
            f"the teacher TEACHER_CHECKPOINT_PATH={path!r} {what}; give the MODEL_DIR of a run "
            "of switch_t5.train (or a converted checkpoint), its checkpoints/ folder or one "
            "step's folder"
        )
    config = init_checkpoint.model_config_from_checkpoint(ref, {})
    saved = ref.meta.get("vocabulary") or {}
    clash = []
    hashes = (saved.get("hash"), (vocabulary or {}).get("hash"))
    if all(hashes) and hashes[0] != hashes[1]:
        clash.append(
            f"the teacher's vocabulary is {saved.get('path')!r} (hash {hashes[0]}), the "
            f"student's {vocabulary.get('path')!r} (hash {hashes[1]})"
        )
    if config.vocab_size != student.vocab_size:
        clash.append(
            f"the teacher has vocab_size={config.vocab_size}, the student "
            f"vocab_size={student.vocab_size}"
        )
    if clash:
        raise DistillationError(
            f"teacher {ref.step_dir} and student must share the vocabulary: "
            + "; ".join(clash)
            + "; train the student with the teacher's vocabulary (VOCABULARY_PATH and "
            "switch_t5.SwitchConfig.vocab_size as the teacher's run had them)"
        )
    return TeacherSpec(settings, ref, config)


def abstract_teacher(spec: TeacherSpec, mesh: jax.sharding.Mesh) -> Teacher:
    """The teacher's module and abstract params laid out on `mesh` (nothing read)."""
    boxed = network.init_abstract(spec.config)["params"]
    shardings = partitioning.params_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return Teacher(spec, network.EncoderDecoder(spec.config), abstract, shardings)


def load_teacher(spec: TeacherSpec, mesh: jax.sharding.Mesh) -> Teacher:
    """The teacher with its params read (strict) onto its shardings on `mesh`."""
    teacher = abstract_teacher(spec, mesh)
    loaded = init_checkpoint.load_initial_params(
        str(spec.ref.step_dir), teacher.abstract_params, strict=True
    )
    return dataclasses.replace(teacher, params=loaded.params)


def describe(teacher: Teacher) -> str:
    """The run's first-line text about its teacher."""
    s = teacher.spec.settings
    return (
        f", distilling teacher {teacher.spec.ref.step_dir} ({teacher.spec.config.num_experts} "
        f"experts) with alpha {s.distillation_alpha}, temperature {s.distillation_temperature}"
    )


# ---------------------------------------------------------------------------------------------
# The loss and the train step.
# ---------------------------------------------------------------------------------------------


def soft_cross_entropy_sum(
    student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array, temperature: float
) -> jax.Array:
    """sum_t w_t * CE(softmax(teacher_t / T), softmax(student_t / T)), <float32>[].

    Args:
      student_logits, teacher_logits: <float>[b, l, v].
      weights: <float32>[b, l].
      temperature: T.
    """
    # Softmax statistics in float32 (selective precision, arXiv 2101.03961 sec. 2.4).
    s = student_logits.astype(jnp.float32) / temperature
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    # [b, l, v] -> [b, l]
    ce = -jnp.sum(jax.nn.softmax(t, axis=-1) * jax.nn.log_softmax(s, axis=-1), axis=-1)
    return jnp.sum(ce * weights)


def objective(
    params: Any,
    batch: trainer.Batch,
    rng: jax.Array,
    total_weight: jax.Array,
    num_microbatches: int,
    module: nn.Module,
    loss_config: trainer.LossConfig,
    router_bias: Any = None,
    *,
    teacher_module: nn.Module,
    teacher_params: Any,
    settings: DistillationConfig,
) -> tuple[jax.Array, dict[str, Any]]:
    """`trainer`'s objective with the teacher's soft targets mixed in (module docstring)."""
    teacher_params = jax.lax.stop_gradient(teacher_params)
    teacher_logits, _ = trainer.apply_model(
        teacher_module, teacher_params, batch, enable_dropout=False
    )
    logits, moe = trainer.apply_model(
        module, params, batch, enable_dropout=True, rng=rng, router_bias=router_bias
    )
    targets, weights = batch["decoder_target_tokens"], trainer.loss_weights(batch)
    sums = trainer.token_losses(logits, targets, weights, loss_config.z_loss)
    temperature, alpha = settings.distillation_temperature, settings.distillation_alpha
    soft = soft_cross_entropy_sum(logits, teacher_logits, weights, temperature)
    teacher_ce = trainer.token_losses(teacher_logits, targets, weights, 0.0)["cross_entropy_sum"]
    ce = sums["cross_entropy_sum"]
    if alpha:  # alpha = 0: exactly the plain loss
        ce = (1.0 - alpha) * ce + alpha * temperature**2 * soft
    aux = trainer.moe_aux_loss(moe, loss_config)
    loss = (ce + sums["z_loss_sum"]) / total_weight + aux / num_microbatches
    extra = {SOFT_CROSS_ENTROPY: soft, TEACHER_CROSS_ENTROPY: teacher_ce}
    return loss, {**sums, **moe, trainer.PER_TOKEN_SUMS: extra}


def make_train_step(run: Any, teacher: Teacher):
    """The jitted distillation train step of `run` (a `run_builder.Run`): `step(state, batch)`
    as `trainer.make_train_step`'s, the teacher's params a third, never donated, input
    (`step.jitted(state, batch, teacher_params)`)."""
    run.losses.check_resolved()
    settings = teacher.spec.settings

    def fn(state, batch, teacher_params):
        step_objective = functools.partial(
            objective,
            teacher_module=teacher.module,
            teacher_params=teacher_params,
            settings=settings,
        )
        return trainer.train_step(
            state,
            batch,
            module=run.module,
            optimizer=run.setup.optimizer,
            loss_config=run.losses,
            num_microbatches=run.num_microbatches,
            objective=step_objective,
        )

    state_shardings = run.setup.shardings
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, dict(run.batch_shardings), teacher.shardings),
        out_shardings=(state_shardings, partitioning.replicated(run.mesh)),
        donate_argnums=(0,),
    )

    def step(state, batch):
        with jax.set_mesh(run.mesh), partitioning.axis_rules():
            return jitted(state, batch, teacher.params)

    step.jitted = jitted
    return step


# ---------------------------------------------------------------------------------------------
# The student's initialisation from the teacher.
# ---------------------------------------------------------------------------------------------


def _unscanned(params: Any, config: SwitchConfig) -> Any:
    return scan_utils.unscan_params(params, config) if config.scan_layers else params


def plan_student_init(
    student: Mapping[str, Any], teacher: Mapping[str, Any], mode: str
) -> dict[str, tuple[str, str]]:
    """{student param: (how, teacher param)} in the unscanned layout; how is "copy",
    "expert_0", "mean" or "random" (teacher param "" then).

    Args:
      student, teacher: {name: leaf with .shape} of both (unscanned, `init_checkpoint.flatten`).
      mode: `student_mlp_init`.

    Raises:
      DistillationError: a student param the teacher has with another shape, or lacks outside
        the MLP of its sparse layers (the student is not the teacher's dense twin).
    """
    plan: dict[str, tuple[str, str]] = {}
    for name in sorted(student):
        want = tuple(student[name].shape)
        m = _MLP.match(name)
        expert = f"{m.group(1)}/expert/{m.group(2)}" if m else None
        if name in teacher:
            got, how, source = tuple(teacher[name].shape), "copy", name
        elif expert in teacher:
            got, how, source = tuple(teacher[expert].shape[1:]), mode, expert
        else:
            raise DistillationError(
                f"the student's parameter {name!r} has no counterpart in the teacher: the "
                "student must be the teacher's dense twin (its model config with num_experts=0)"
            )
        if how == "random":
            plan[name] = ("random", "")
            continue
        if want != got:
            raise DistillationError(
                f"the student's parameter {name!r} has shape {want} but the teacher's {source!r} "
                f"gives {got}: the student must be the teacher's dense twin (same d_model, heads, "
                "d_ff, layers and vocabulary)"
                + (", or use student_mlp_init='random'" if how != "copy" else "")
            )
        plan[name] = (how, source)
    return plan


def _student_value(how: str, source: Any, fresh: Any) -> Any:
    if how == "random":
        return fresh
    if how == "expert_0":
        source = source[0]
    elif how == "mean":
        # [experts, ...] -> [...]
        source = jnp.mean(source.astype(jnp.float32), axis=0)
    # A buffer of its own: the student's state is donated to the train step, the teacher's
    # params never are (jit would forward an input returned as is).
    return jnp.copy(source.astype(fresh.dtype))


def init_student(setup: Any, student: SwitchConfig, teacher: Teacher) -> TrainState:
    """A fresh student TrainState (step 0, new optimizer state, a fresh run's rng) whose params
    come from the teacher (module docstring), on `setup.shardings`."""
    mode = teacher.spec.settings.student_mlp_init
    flat_student = init_checkpoint.flatten(
        jax.eval_shape(lambda p: _unscanned(p, student), setup.abstract_state.params)
    )
    flat_teacher = init_checkpoint.flatten(
        jax.eval_shape(lambda p: _unscanned(p, teacher.spec.config), teacher.abstract_params)
    )
    plan = plan_student_init(flat_student, flat_teacher, mode)
    optimizer = setup.optimizer

    def build(fresh: TrainState, teacher_params: Any) -> TrainState:
        fresh_params = _unscanned(fresh.params, student)
        t = init_checkpoint.flatten(_unscanned(teacher_params, teacher.spec.config))
        names = list(init_checkpoint.flatten(fresh_params))
        values = init_checkpoint.flatten(fresh_params)
        leaves = [_student_value(plan[n][0], t.get(plan[n][1]), values[n]) for n in names]
        params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh_params), leaves)
        if student.scan_layers:
            params = scan_utils.scan_params(params, student)
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            opt_state=optimizer.tx.init(params),
            rng=fresh.rng,
        )

    mesh = partitioning.run_mesh(setup.shardings)
    with jax.set_mesh(mesh), partitioning.axis_rules():
        return jax.jit(build, out_shardings=setup.shardings, donate_argnums=0)(
            setup.init_fn(), teacher.params
        )


def student_init_text(teacher: Teacher) -> str:
    """How the student began, for the run's log."""
    mode = teacher.spec.settings.student_mlp_init
    return f"student params from the teacher's non-expert weights, sparse-layer MLPs {mode}"
