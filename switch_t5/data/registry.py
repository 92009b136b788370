"""The task registry: which builder registers the seqio task a run names, and the macros it reads.

A task builder is a plain function `builder(name, macros, settings) -> None` that registers the
seqio task (or mixture) `name` in seqio's registries. It is registered here under one or more
names; a name ending in `*` is a prefix pattern (`glue_*`). Each builder declares the gin macros
it reads (`Macro(name, default)`; a bare string is a required macro). The gin edge
(`switch_t5.data_gin.register_tasks`) reads those macros once and calls the builder with their
values in `macros` (a dict keyed by macro name) and the run's `DataSettings`; the builder never
reads gin. `macro_names()` is the one list of macros the data pipeline reads by name
(`data_gin.MACROS`, which the unused-macro check of `gin_utils` counts as used).

The shipped tasks (`switch_t5.data.builtin_tasks`) register through the same function a user
calls. A user's task, in a module on PYTHONPATH that the gin file imports (`import my_tasks`):

    # my_tasks.py
    from switch_t5.data import registry

    def build(name, macros, settings):
        from switch_t5.data import user_tasks
        user_tasks.register_files_text_to_text(
            name, train_files=macros["MY_FILES"], input_template="q: {q}", target_column="a",
            vocabulary_path=settings.vocabulary_path(macros["VOCABULARY_PATH"]))

    registry.register_task_builder("my_qa", build, macros=("MY_FILES", "VOCABULARY_PATH"))

A module that adds a task to seqio's TaskRegistry itself (no builder) works too: a name that no
builder matches but seqio knows is used as registered. No module here imports gin or
TensorFlow (builders import TensorFlow when they run).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from switch_t5 import errors
from switch_t5.data import corpus, lengths


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


# The default of a macro the builder cannot do without.
REQUIRED: Any = _Required()
_MACRO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class MissingMacroError(errors.UserError):
    """A task needs a gin macro that is not set."""


class TaskRegistryError(errors.UserError):
    """A task builder is registered twice under one name, or with a bad name or macro."""


@dataclasses.dataclass(frozen=True)
class Macro:
    """A gin macro a task builder reads.

    Attributes:
      name: the macro (`TEXT_FILES`).
      default: its value when unset; `REQUIRED` makes an unset macro a MissingMacroError.
    """

    name: str
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The run's data settings (gin: `switch_t5.data_gin.register_tasks.*`); defaults here.

    Attributes:
      cache_dir: where the embedded corpus, its vocabularies and converted text files are
        cached (None: `$SWITCH_T5_CACHE_DIR`, else `~/.cache/switch_t5`).
      embedded_vocab_size: ids of the embedded corpus's vocabulary, 100 extra ids included.
      text_validation_fraction: documents of TEXT_FILES held out for validation when
        VALIDATION_FILES is not set.
      txt_documents: `.txt` files hold one document per "line" or per blank-line "paragraph".
      shuffle_buffer_size: span-corrupted pieces in the shuffle buffer of the embedded and
        text-files tasks (seqio's default 1000).
      target_scan_examples: free-text targets: the first N examples of a split are tokenized
        to refuse a targets length that would cut them (`switch_t5.data.lengths`); 0: no scan.
    """

    cache_dir: str | None = None
    embedded_vocab_size: int = corpus.DEFAULT_VOCAB_SIZE
    text_validation_fraction: float = 0.01
    txt_documents: str = "line"
    shuffle_buffer_size: int = 1000
    target_scan_examples: int = lengths.DEFAULT_TARGET_SCAN_EXAMPLES

    def vocabulary_path(self, path: str) -> str:
        """`path`, or the embedded corpus's vocabulary file for `"embedded"`
        (`corpus.EMBEDDED_VOCABULARY`, trained on first use)."""
        return corpus.resolve_vocabulary_path(path, self.cache_dir, self.embedded_vocab_size)


Builder = Callable[[str, Mapping[str, Any], DataSettings], None]


@dataclasses.dataclass(frozen=True)
class TaskBuilder:
    """A registered builder.

    Attributes:
      names: exact task names and `prefix*` patterns the builder serves.
      build: `build(name, macros, settings)`; registers `name` in seqio.
      macros: the macros it reads, in the order they are checked.
      description: how the unknown-task message lists it (default: the names).
    """

    names: tuple[str, ...]
    build: Builder
    macros: tuple[Macro, ...]
    description: str


_BUILDERS: list[TaskBuilder] = []
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True  # first: builtin_tasks calls register_task_builder
        from switch_t5.data import builtin_tasks  # noqa: F401  (registers the shipped tasks)


def _origin(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _macro(spec: Macro | str) -> Macro:
    macro = Macro(spec) if isinstance(spec, str) else spec
    if not isinstance(macro, Macro) or not _MACRO_NAME.match(macro.name):
        raise TaskRegistryError(
            f"task builder macro {spec!r}: give a macro name (`MY_FILES`) or "
            "registry.Macro('MY_FILES', default)"
        )
    return macro


def register_task_builder(
    names: str | Sequence[str],
    builder: Builder,
    macros: Sequence[Macro | str] = (),
    description: str | None = None,
) -> TaskBuilder:
    """Registers `builder` for the task names (or `prefix*` patterns) `names`.

    Args:
      names: a task name or several; `glue_*` matches every name starting with `glue_`.
      builder: `builder(name, macros, settings) -> None` registers the seqio task `name`;
        `macros` maps each declared macro name to its value, `settings` is a `DataSettings`.
      macros: the gin macros it reads: `"NAME"` (required) or `Macro("NAME", default)`.
      description: how the unknown-task error lists it (default: the names).

    Returns:
      The registered TaskBuilder (`unregister_task_builder` removes it).

    Raises:
      TaskRegistryError: a name is served by another builder already, or a name or macro is bad.
        Registering the same function again (a module imported twice) replaces it.
    """
    _load_builtins()
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names or not all(isinstance(n, str) and n.strip("*") for n in names):
        raise TaskRegistryError(f"task builder names {names!r}: give task names (`my_task`)")
    if not callable(builder):
        raise TaskRegistryError(
            f"task builder for {names[0]!r} is a {type(builder).__name__}; give a function "
            "builder(name, macros, settings)"
        )
    entry = TaskBuilder(
        names, builder, tuple(_macro(m) for m in macros), description or ", ".join(names)
    )
    for old in list(_BUILDERS):
        taken = set(old.names) & set(names)
        if taken and _origin(old.build) == _origin(builder):
            _BUILDERS.remove(old)
        elif taken:
            raise TaskRegistryError(
                f"task {sorted(taken)[0]!r} already has a builder ({_origin(old.build)}); "
                "register yours under another name, or unregister_task_builder the old one"
            )
    _BUILDERS.append(entry)
    return entry


def unregister_task_builder(entry: TaskBuilder) -> None:
    """Removes a builder `register_task_builder` returned (no error if it is gone)."""
    if entry in _BUILDERS:
        _BUILDERS.remove(entry)


def builders() -> tuple[TaskBuilder, ...]:
    """Every registered builder, the shipped ones first."""
    _load_builtins()
    return tuple(_BUILDERS)


def find_builder(name: str) -> TaskBuilder | None:
    """The builder of task `name`: the one registered under that exact name, else the one with
    the longest matching `prefix*` pattern (None: no builder serves it)."""
    best: tuple[int, TaskBuilder | None] = (0, None)
    for entry in builders():
        if name in entry.names:
            return entry
        for pattern in entry.names:
            if pattern.endswith("*") and name.startswith(pattern[:-1]) and len(pattern) > best[0]:
                best = (len(pattern), entry)
    return best[1]


def macro_names() -> tuple[str, ...]:
    """Every macro a builder reads, once each, in registration order."""
    return tuple(dict.fromkeys(m.name for b in builders() for m in b.macros))


def unknown_task_message(name: str) -> str:
    """The error for a name that no builder serves and seqio does not know."""
    known = ", ".join(dict.fromkeys(b.description for b in builders()))
    return (
        f"MIXTURE_OR_TASK_NAME={name!r} is not a known task: use one of {known}, or register "
        "your own (switch_t5.data.registry.register_task_builder, or a seqio task) in a module "
        "that your gin file imports (`import my_tasks`)"
    )
