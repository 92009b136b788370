"""The gin edge of the data pipeline: registers the task a run names, from gin macros only.

The only data module that imports gin. Entry points (train, eval, show) import it BEFORE parsing
gin (so `switch_t5.data_gin.register_tasks.*` bindings are known), then call `register_tasks()`,
`get_vocabulary(name)` and `check_lengths(name, TASK_FEATURE_LENGTHS)` (which refuses lengths
that are not positive integers or would cut the task's labels or targets, before anything is
built). A user sets only the macros the chosen task needs:

- `embedded_span_corruption`: no macro needed.
- `text_files_span_corruption`: TEXT_FILES, VOCABULARY_PATH; optional VALIDATION_FILES.
- `c4_span_corruption`, `c4_v220_span_corruption`: optional VOCABULARY_PATH (default T5's
  cc_all.32000) and TFDS_DATA_DIR.
- GLUE / SuperGLUE tasks and mixtures (`glue_*`, `super_glue_*`, `dpr_*`): optional
  VOCABULARY_PATH, TFDS_DATA_DIR.
- `files_text_to_text`: VOCABULARY_PATH, INPUT_TEMPLATE, TARGET_COLUMN, and TRAIN_FILES and/or
  VALIDATION_FILES; optional LABEL_NAMES, METRICS, HAS_HEADER, COLUMN_NAMES (see
  `switch_t5.data.user_tasks`).

`VOCABULARY_PATH = "embedded"` names the embedded corpus's vocabulary (to fine-tune a model
pretrained on `embedded_span_corruption`). A task already in seqio's registry (registered by the
user's own module) is left alone. A missing required macro raises `MissingMacroError` naming it.

    # configs/runs/my_text.gin
    MIXTURE_OR_TASK_NAME = "text_files_span_corruption"
    TEXT_FILES = "/data/books/*.txt"
    VOCABULARY_PATH = "/data/books/spm.model"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gin

from switch_t5 import errors
from switch_t5.data.lengths import DEFAULT_TARGET_SCAN_EXAMPLES

_UNSET = object()
_GLUE_PREFIXES = ("glue_", "super_glue_", "dpr_")
_SPAN_TASKS = (
    "embedded_span_corruption",
    "text_files_span_corruption",
    "c4_span_corruption",
    "c4_v220_span_corruption",
)
_FINETUNE_MACROS = (
    "TRAIN_FILES",
    "VALIDATION_FILES",
    "VOCABULARY_PATH",
    "INPUT_TEMPLATE",
    "TARGET_COLUMN",
    "LABEL_NAMES",
    "METRICS",
    "HAS_HEADER",
    "COLUMN_NAMES",
)
# Every macro `macro()` reads by name: set without any `%NAME` reference in a binding, they are
# still used (`gin_utils.check_macros_used` refuses other macros that no binding references).
MACROS = (
    "MIXTURE_OR_TASK_NAME",
    "VOCABULARY_PATH",
    "TEXT_FILES",
    "TFDS_DATA_DIR",
    *_FINETUNE_MACROS,
)
EMBEDDED_VOCABULARY = "embedded"


class MissingMacroError(errors.UserError):
    """A task needs a gin macro that is not set."""


def macro(name: str, default: Any = _UNSET, *, needed_by: str = "") -> Any:
    """The value of gin macro `name`; `default` when unset (or MissingMacroError if none).

    `name` must be in `MACROS`, so that setting it is not refused as unused.
    """
    if name not in MACROS:
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


@gin.configurable(module="switch_t5.data_gin")
def register_tasks(
    mixture_or_task_name: str | None = None,
    cache_dir: str | None = None,
    embedded_vocab_size: int = 4096,
    text_validation_fraction: float = 0.01,
    txt_documents: str = "line",
    shuffle_buffer_size: int = 1000,
    target_scan_examples: int = DEFAULT_TARGET_SCAN_EXAMPLES,
) -> None:
    """Registers the task or mixture the run names (and the tasks it needs) in seqio.

    Args:
      mixture_or_task_name: None reads the MIXTURE_OR_TASK_NAME macro.
      cache_dir: where the embedded corpus, its vocabularies and converted text files are cached
        (None: `$SWITCH_T5_CACHE_DIR`, else `~/.cache/switch_t5`).
      embedded_vocab_size: ids of the embedded corpus's vocabulary, 100 extra ids included.
      text_validation_fraction: documents of TEXT_FILES held out for validation when
        VALIDATION_FILES is not set.
      txt_documents: `.txt` files hold one document per "line" or per blank-line "paragraph".
      shuffle_buffer_size: span-corrupted pieces in the shuffle buffer of the embedded and
        text-files tasks (seqio's default 1000).
      target_scan_examples: `files_text_to_text` with free-text targets (no LABEL_NAMES): the
        first N examples of a split are tokenized, and a TASK_FEATURE_LENGTHS targets length
        that would cut any of them is an error (`switch_t5.data.lengths`); 0 skips the scan.
        Labels (and GLUE/SuperGLUE labels) are always checked.

    Raises:
      MissingMacroError: a macro the task needs is not set.
      UserError: the name is not a known task or mixture.
    """
    import seqio

    name = mixture_or_task_name or macro("MIXTURE_OR_TASK_NAME", needed_by="the data pipeline")
    from switch_t5.data import tasks
    from switch_t5.data import vocab as vocab_lib

    def vocabulary_path(required: bool) -> str:
        default = _UNSET if required else vocab_lib.DEFAULT_SPM_PATH
        path = macro("VOCABULARY_PATH", default, needed_by=name)
        if path == EMBEDDED_VOCABULARY:
            from switch_t5.data import corpus

            info = corpus.prepare_embedded_corpus(cache_dir)
            path = corpus.embedded_vocabulary_path(info, embedded_vocab_size)
        return path

    if name == tasks.EMBEDDED_TASK:
        tasks.register_embedded_task(
            vocab_size=embedded_vocab_size,
            cache_dir=cache_dir,
            shuffle_buffer_size=shuffle_buffer_size,
        )
    elif name == tasks.TEXT_FILES_TASK:
        files = macro("TEXT_FILES", needed_by=name)
        tasks.register_text_files_task(
            files,
            vocabulary_path=vocabulary_path(required=True),
            validation_files=macro("VALIDATION_FILES", None),
            validation_fraction=text_validation_fraction,
            txt_documents=txt_documents,
            cache_dir=cache_dir,
            shuffle_buffer_size=shuffle_buffer_size,
        )
    elif name in (tasks.C4_TASK, tasks.C4_V220_TASK):
        tasks.register_c4_tasks(
            vocab_lib.get_vocabulary(vocabulary_path(required=False)),
            tfds_data_dir=macro("TFDS_DATA_DIR", None),
        )
    elif name == "files_text_to_text":
        from switch_t5.data import user_tasks

        kwargs = {m.lower(): macro(m, None) for m in _FINETUNE_MACROS}
        for required in ("VOCABULARY_PATH", "INPUT_TEMPLATE", "TARGET_COLUMN"):
            macro(required, needed_by=name)
        if kwargs["train_files"] is None and kwargs["validation_files"] is None:
            raise MissingMacroError(
                f"{name} needs TRAIN_FILES (to fine-tune) and/or VALIDATION_FILES (to evaluate); "
                "set them to a glob or a list of files"
            )
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs["vocabulary_path"] = vocabulary_path(required=True)
        user_tasks.register_files_text_to_text(**kwargs, target_scan_examples=target_scan_examples)
    elif name.startswith(_GLUE_PREFIXES):
        from switch_t5.data import glue

        registered = glue.register_glue_tasks(
            vocab_lib.get_vocabulary(vocabulary_path(required=False)),
            tfds_data_dir=macro("TFDS_DATA_DIR", None),
        )
        if name not in registered:
            raise errors.UserError(
                f"MIXTURE_OR_TASK_NAME={name!r} is not a GLUE/SuperGLUE task or mixture; known: "
                f"{', '.join(sorted(registered))}"
            )
    elif name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
        raise errors.UserError(
            f"MIXTURE_OR_TASK_NAME={name!r} is not a known task: use one of "
            f"{', '.join(_SPAN_TASKS)}, "
            "files_text_to_text, a GLUE/SuperGLUE task (glue_*, super_glue_*), or register your "
            "own seqio task in a module imported before the run"
        )


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
