"""The shipped tasks, registered in `switch_t5.data.registry` like a user's task would be.

- `embedded_span_corruption`: no macro needed.
- `text_files_span_corruption`: TEXT_FILES, VOCABULARY_PATH; optional VALIDATION_FILES.
  TEXT_FILES as a mapping `{language: glob}` makes it a mixture of one task per language
  (`text_files_span_corruption.<language>`) sampled with p(L) ~ n(L)^MC4_ALPHA (default 0.3);
  VALIDATION_FILES is then a mapping too (languages left out hold a fraction out).
- `mc4_span_corruption` (the mixture of mC4's 107 language tasks) and
  `mc4_span_corruption.<language>`: optional VOCABULARY_PATH (default mT5's mc4.250000.100extra),
  MC4_ALPHA, MC4_LANGUAGES, TFDS_DATA_DIR, or the released JSON files: MC4_FILES,
  MC4_VALIDATION_FILES, MC4_COUNTS (see `switch_t5.data.multilingual_tasks`).
- `c4_span_corruption`, `c4_v220_span_corruption`: optional VOCABULARY_PATH (default T5's
  cc_all.32000) and TFDS_DATA_DIR.
- GLUE / SuperGLUE tasks and mixtures (`glue_*`, `super_glue_*`, `dpr_*`): optional
  VOCABULARY_PATH, TFDS_DATA_DIR.
- `files_text_to_text`: VOCABULARY_PATH, INPUT_TEMPLATE, TARGET_COLUMN, and TRAIN_FILES and/or
  VALIDATION_FILES; optional LABEL_NAMES, METRICS, HAS_HEADER, COLUMN_NAMES (see
  `switch_t5.data.user_tasks`).

The task names live here (TensorFlow-free); `tasks` and `user_tasks` re-export them. The
builders import the TensorFlow modules only when they run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from switch_t5 import errors
from switch_t5.data import multilingual, registry
from switch_t5.data import vocab as vocab_lib
from switch_t5.data.registry import DataSettings, Macro

EMBEDDED_TASK = "embedded_span_corruption"
TEXT_FILES_TASK = "text_files_span_corruption"
C4_TASK = "c4_span_corruption"
C4_V220_TASK = "c4_v220_span_corruption"
FILES_TEXT_TO_TEXT_TASK = "files_text_to_text"
MC4_TASK = multilingual.MC4_TASK
GLUE_PATTERNS = ("glue_*", "super_glue_*", "dpr_*")
_ALPHA = Macro("MC4_ALPHA", multilingual.DEFAULT_ALPHA)
_MC4_MACROS = (
    Macro("VOCABULARY_PATH", multilingual.MC4_VOCABULARY_PATH),
    Macro("TFDS_DATA_DIR", None),
    _ALPHA,
    *(Macro(name, None) for name in ("MC4_LANGUAGES", "MC4_FILES", "MC4_VALIDATION_FILES")),
    Macro("MC4_COUNTS", None),
)
# Optional for the TFDS tasks: T5's cc_all.32000 model when unset.
_TFDS_MACROS = (Macro("VOCABULARY_PATH", vocab_lib.DEFAULT_SPM_PATH), Macro("TFDS_DATA_DIR", None))
# files_text_to_text's macros, each an argument of `user_tasks.register_files_text_to_text`
# (lower-cased); the three required ones first, in the order they are checked.
_FILES_MACROS = (
    Macro("VOCABULARY_PATH"),
    Macro("INPUT_TEMPLATE"),
    Macro("TARGET_COLUMN"),
    *(
        Macro(name, None)
        for name in (
            "TRAIN_FILES",
            "VALIDATION_FILES",
            "LABEL_NAMES",
            "METRICS",
            "HAS_HEADER",
            "COLUMN_NAMES",
        )
    ),
)


def build_embedded(name: str, macros: Mapping[str, Any], settings: DataSettings) -> None:
    from switch_t5.data import tasks

    tasks.register_embedded_task(
        vocab_size=settings.embedded_vocab_size,
        cache_dir=settings.cache_dir,
        name=name,
        shuffle_buffer_size=settings.shuffle_buffer_size,
    )


def build_text_files(name: str, macros: Mapping[str, Any], settings: DataSettings) -> None:
    """One task over TEXT_FILES (a glob or a list), or a language mixture (a mapping)."""
    if isinstance(macros["TEXT_FILES"], Mapping):
        return _build_multilingual_text_files(name, macros, settings)
    if isinstance(macros["VALIDATION_FILES"], Mapping) or name != TEXT_FILES_TASK:
        raise errors.UserError(
            f"{name}: TEXT_FILES is one glob or list of files, so there is one task, "
            f"{TEXT_FILES_TASK}, with VALIDATION_FILES a glob or list; for one task per language "
            "set TEXT_FILES (and VALIDATION_FILES) to a mapping {language: glob}"
        )
    from switch_t5.data import tasks

    tasks.register_text_files_task(
        macros["TEXT_FILES"],
        vocabulary_path=settings.vocabulary_path(macros["VOCABULARY_PATH"]),
        validation_files=macros["VALIDATION_FILES"],
        validation_fraction=settings.text_validation_fraction,
        txt_documents=settings.txt_documents,
        cache_dir=settings.cache_dir,
        name=name,
        shuffle_buffer_size=settings.shuffle_buffer_size,
    )


def _build_multilingual_text_files(
    name: str, macros: Mapping[str, Any], settings: DataSettings
) -> None:
    from switch_t5.data import multilingual_tasks

    languages = macros["TEXT_FILES"]
    tasks = {multilingual.language_task_name(TEXT_FILES_TASK, lang): lang for lang in languages}
    if name != TEXT_FILES_TASK and name not in tasks:
        raise errors.UserError(
            f"MIXTURE_OR_TASK_NAME={name!r}: TEXT_FILES maps the languages {list(languages)}, "
            f"so the tasks are {TEXT_FILES_TASK} (their mixture) and {', '.join(tasks)}"
        )
    multilingual_tasks.register_multilingual_text_files(
        TEXT_FILES_TASK,
        macros["TEXT_FILES"],
        vocabulary_path=settings.vocabulary_path(macros["VOCABULARY_PATH"]),
        validation_files=macros["VALIDATION_FILES"],
        alpha=macros["MC4_ALPHA"],
        validation_fraction=settings.text_validation_fraction,
        txt_documents=settings.txt_documents,
        cache_dir=settings.cache_dir,
        shuffle_buffer_size=settings.shuffle_buffer_size,
    )


def build_mc4(name: str, macros: Mapping[str, Any], settings: DataSettings) -> None:
    """The mixture, or one language's task (`name`)."""
    from switch_t5.data import multilingual_tasks

    multilingual_tasks.register_mc4_tasks(
        name,
        vocabulary_path=settings.vocabulary_path(macros["VOCABULARY_PATH"]),
        languages=macros["MC4_LANGUAGES"],
        alpha=macros["MC4_ALPHA"],
        files=macros["MC4_FILES"],
        validation_files=macros["MC4_VALIDATION_FILES"],
        counts=macros["MC4_COUNTS"],
        tfds_data_dir=macros["TFDS_DATA_DIR"],
        shuffle_buffer_size=settings.shuffle_buffer_size,
    )


def build_c4(name: str, macros: Mapping[str, Any], settings: DataSettings) -> None:
    """Registers both C4 tasks (either name)."""
    from switch_t5.data import tasks

    tasks.register_c4_tasks(
        vocab_lib.get_vocabulary(settings.vocabulary_path(macros["VOCABULARY_PATH"])),
        tfds_data_dir=macros["TFDS_DATA_DIR"],
    )


def build_glue(name: str, macros: Mapping[str, Any], settings: DataSettings) -> None:
    """Registers every GLUE/SuperGLUE task and mixture; `name` must be one of them."""
    from switch_t5.data import glue

    registered = glue.register_glue_tasks(
        vocab_lib.get_vocabulary(settings.vocabulary_path(macros["VOCABULARY_PATH"])),
        tfds_data_dir=macros["TFDS_DATA_DIR"],
    )
    if name not in registered:
        raise errors.UserError(
            f"MIXTURE_OR_TASK_NAME={name!r} is not a GLUE/SuperGLUE task or mixture; known: "
            f"{', '.join(sorted(registered))}"
        )


def build_files_text_to_text(name: str, macros: Mapping[str, Any], settings: DataSettings) -> None:
    from switch_t5.data import user_tasks

    if macros["TRAIN_FILES"] is None and macros["VALIDATION_FILES"] is None:
        raise registry.MissingMacroError(
            f"{name} needs TRAIN_FILES (to fine-tune) and/or VALIDATION_FILES (to evaluate); "
            "set them to a glob or a list of files"
        )
    kwargs = {k.lower(): v for k, v in macros.items() if v is not None}
    kwargs["vocabulary_path"] = settings.vocabulary_path(macros["VOCABULARY_PATH"])
    user_tasks.register_files_text_to_text(
        name, **kwargs, target_scan_examples=settings.target_scan_examples
    )


registry.register_task_builder(EMBEDDED_TASK, build_embedded)
registry.register_task_builder(
    (TEXT_FILES_TASK, f"{TEXT_FILES_TASK}.*"),
    build_text_files,
    macros=("TEXT_FILES", "VOCABULARY_PATH", Macro("VALIDATION_FILES", None), _ALPHA),
    description=TEXT_FILES_TASK,
)
registry.register_task_builder((C4_TASK, C4_V220_TASK), build_c4, macros=_TFDS_MACROS)
registry.register_task_builder(
    (MC4_TASK, f"{MC4_TASK}.*"),
    build_mc4,
    macros=_MC4_MACROS,
    description=f"{MC4_TASK} (or {MC4_TASK}.<language>)",
)
registry.register_task_builder(
    FILES_TEXT_TO_TEXT_TASK, build_files_text_to_text, macros=_FILES_MACROS
)
registry.register_task_builder(
    GLUE_PATTERNS,
    build_glue,
    macros=_TFDS_MACROS,
    description="a GLUE/SuperGLUE task (glue_*, super_glue_*)",
)
