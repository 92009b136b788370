"""The gin edge of the data pipeline: registers the task a run names, from gin macros only.

The only data module that imports gin, and the one place that reads the data macros. Entry
points (train, eval, show) import it BEFORE parsing gin (so `switch_t5.data_gin.register_tasks.*`
bindings are known), then call `register_tasks()`, `get_vocabulary(name)` and
`check_lengths(name, TASK_FEATURE_LENGTHS)` (which refuses lengths that are not positive integers
or would cut the task's labels or targets, before anything is built).

Which task builder serves a name, and which macros it reads, is `switch_t5.data.registry`'s
business (the shipped tasks and their macros: `switch_t5.data.builtin_tasks`). `register_tasks`
reads the builder's macros once and passes their values to it; a user sets only the macros the
chosen task needs. `MACROS` (every macro read by name: MIXTURE_OR_TASK_NAME and the builders')
is derived from the registry, so a user task's macros imported by a gin `import my_tasks` line
count as used too.

`VOCABULARY_PATH = "embedded"` names the embedded corpus's vocabulary (to fine-tune a model
pretrained on `embedded_span_corruption`). A task already in seqio's registry that no builder
serves (registered by the user's own module) is left alone. A missing required macro raises
`MissingMacroError` naming it.

    # configs/runs/my_text.gin
    MIXTURE_OR_TASK_NAME = "text_files_span_corruption"
    TEXT_FILES = "/data/books/*.txt"
    VOCABULARY_PATH = "/data/books/spm.model"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gin

from switch_t5 import errors
from switch_t5.data import corpus, registry
from switch_t5.data.registry import DataSettings

_UNSET = registry.REQUIRED
TASK_MACRO = "MIXTURE_OR_TASK_NAME"
EMBEDDED_VOCABULARY = corpus.EMBEDDED_VOCABULARY
MissingMacroError = registry.MissingMacroError


def macro_names() -> tuple[str, ...]:
    """Every macro `macro()` reads by name: MIXTURE_OR_TASK_NAME and each task builder's.

    Set without any `%NAME` reference in a binding, they are still used
    (`gin_utils.check_macros_used` refuses other macros that no binding references).
    """
    return (TASK_MACRO, *(m for m in registry.macro_names() if m != TASK_MACRO))


def __getattr__(name: str) -> Any:
    # `MACROS` is computed on each read: a user module imported while parsing may add macros.
    if name == "MACROS":
        return macro_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def macro(name: str, default: Any = _UNSET, *, needed_by: str = "") -> Any:
    """The value of gin macro `name`; `default` when unset (or MissingMacroError if none).

    `name` must be in `MACROS`, so that setting it is not refused as unused.
    """
    if name not in macro_names():
        raise AssertionError(f"macro {name!r} is read by code but missing from data_gin.MACROS")
    try:
        value = gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        if default is _UNSET:
            raise MissingMacroError(
                f"gin macro {name} is not set but {needed_by or 'this run'} needs it; add "
                f"`{name} = ...` to a gin file or pass --gin.{name}=..."
            ) from None
        return default
    # `NAME = %OTHER`: follow macro references to the value.
    for _ in range(16):
        if not isinstance(value, gin.config.ConfigurableReference):
            break
        value = value.scoped_configurable_fn()
    return value


def set_macros() -> dict[str, Any]:
    """The data macros this run sets (MIXTURE_OR_TASK_NAME aside) and their values."""
    values = {name: macro(name, None) for name in macro_names() if name != TASK_MACRO}
    return {name: value for name, value in values.items() if value is not None}


def task_record(mixture_or_task_name: str) -> dict[str, Any]:
    """The task record a checkpoint's meta stores: the name and every data macro the run set
    (MIXTURE_OR_TASK_NAME aside), so that eval and infer can rebuild the task from the run."""
    return {"name": mixture_or_task_name, "data": set_macros()}


def bind_unset_macros(values: Mapping[str, Any]) -> None:
    """Binds each data macro of `values` that the run does not set (others are ignored)."""
    names = macro_names()
    for name, value in values.items():
        if name in names and macro(name, None) is None:
            with gin.unlock_config():
                gin.bind_parameter(f"{name}/macro.value", value)


@gin.configurable(module="switch_t5.data_gin")
def register_tasks(
    mixture_or_task_name: str | None = None,
    cache_dir: str | None = DataSettings.cache_dir,
    embedded_vocab_size: int = DataSettings.embedded_vocab_size,
    text_validation_fraction: float = DataSettings.text_validation_fraction,
    txt_documents: str = DataSettings.txt_documents,
    shuffle_buffer_size: int = DataSettings.shuffle_buffer_size,
    target_scan_examples: int = DataSettings.target_scan_examples,
) -> None:
    """Registers the task or mixture the run names (and the tasks it needs) in seqio.

    Args:
      mixture_or_task_name: None reads the MIXTURE_OR_TASK_NAME macro.
      cache_dir, embedded_vocab_size, text_validation_fraction, txt_documents,
        shuffle_buffer_size, target_scan_examples: the run's data settings
        (`switch_t5.data.registry.DataSettings`, where they are described). Labels (and
        GLUE/SuperGLUE labels) are always checked against the targets length;
        `target_scan_examples` (0 skips) bounds the scan of free-text targets.

    Raises:
      MissingMacroError: a macro the task needs is not set.
      UserError: the name is not a known task or mixture.
    """
    name = mixture_or_task_name or macro(TASK_MACRO, needed_by="the data pipeline")
    settings = DataSettings(
        cache_dir=cache_dir,
        embedded_vocab_size=embedded_vocab_size,
        text_validation_fraction=text_validation_fraction,
        txt_documents=txt_documents,
        shuffle_buffer_size=shuffle_buffer_size,
        target_scan_examples=target_scan_examples,
    )
    builder = registry.find_builder(name)
    if builder is not None:
        values = {m.name: macro(m.name, m.default, needed_by=name) for m in builder.macros}
        builder.build(name, values, settings)
        return
    import seqio

    if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
        raise errors.UserError(registry.unknown_task_message(name))


def data_settings() -> DataSettings:
    """The run's data settings: `DataSettings` with the `register_tasks.*` gin bindings."""
    bound = gin.get_bindings(register_tasks, resolve_references=True)
    bound.pop("mixture_or_task_name", None)
    return DataSettings(**bound)


def vocabulary_path(path: str) -> str:
    """`path`, or the embedded corpus's vocabulary file (as this run's settings make it) for
    `VOCABULARY_PATH = "embedded"`."""
    return data_settings().vocabulary_path(path)


def get_vocabulary(task_name: str):
    """The `seqio.Vocabulary` of a registered task or mixture (call `register_tasks` first)."""
    import seqio

    from switch_t5.data import tasks

    if (
        task_name not in seqio.TaskRegistry.names()
        and task_name not in seqio.MixtureRegistry.names()
    ):
        raise ValueError(
            f"task {task_name!r} is not registered; call switch_t5.data_gin.register_tasks() "
            "after parsing gin"
        )
    return tasks.get_vocabulary(task_name)


def check_lengths(
    task_name: str,
    task_feature_lengths: Any,
    splits: Sequence[str] = ("train", "validation"),
) -> dict[str, int]:
    """Validates TASK_FEATURE_LENGTHS for a registered task or mixture (call `register_tasks`
    first), before anything is built: positive integers for `inputs` and `targets`, and no
    label or target of the task (in each of `splits` it has) cut by the targets length.

    Returns:
      The lengths as a `{"inputs": int, "targets": int}` dict.

    Raises:
      switch_t5.data.lengths.FeatureLengthsError, TargetLengthError (UserErrors): see
        `switch_t5.data.tasks.check_lengths`.
    """
    from switch_t5.data import lengths, tasks

    checked = lengths.check_feature_lengths(task_feature_lengths)
    for split in splits:
        tasks.check_lengths(task_name, split, checked)
    return checked
