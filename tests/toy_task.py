"""A user's own task, as a user would write it: `toy_reverse` (reverse the words of a line).

Importing this module registers the task builder (what a gin file's `import toy_task` line
does; `tests/` must be on the import path, as it is under pytest; a subprocess needs
`PYTHONPATH=<repo>/tests:<repo>`). Macros:

    MIXTURE_OR_TASK_NAME = "toy_reverse"
    TOY_FILES = "/data/lines*.txt"      # required: text files, one example per line
    VOCABULARY_PATH = "/data/spm.model" # required (or "embedded")
    TOY_PREFIX = "reverse:"             # optional: the inputs' prefix (this is the default)

Example: inputs "reverse: a b c", targets "c b a". Splits `train` and `validation` both read
TOY_FILES. Tests call `register()` for a clean registration and its cleanup.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from switch_t5.data import registry

TASK_NAME = "toy_reverse"
MACROS = ("TOY_FILES", "VOCABULARY_PATH", registry.Macro("TOY_PREFIX", "reverse:"))


def _reverse_words(dataset, prefix: str):
    import tensorflow as tf

    def example(line):  # seqio.TextLineDataSource gives each line as a string
        words = tf.strings.split(tf.strings.strip(line))
        return {
            "inputs": tf.strings.join([prefix, tf.strings.reduce_join(words, separator=" ")], " "),
            "targets": tf.strings.reduce_join(tf.reverse(words, [0]), separator=" "),
        }

    return dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def build(name: str, macros: Mapping[str, Any], settings: registry.DataSettings) -> None:
    """Registers `name` in seqio: TOY_FILES' lines, words reversed, with VOCABULARY_PATH."""
    import functools

    import seqio

    from switch_t5.data import tasks, vocab

    vocabulary = vocab.get_vocabulary(settings.vocabulary_path(macros["VOCABULARY_PATH"]))
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    files = macros["TOY_FILES"]
    seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource({"train": files, "validation": files}),
        preprocessors=[
            functools.partial(_reverse_words, prefix=macros["TOY_PREFIX"]),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=tasks.output_features(vocabulary),
        metric_fns=[],
    )


_ENTRY = registry.register_task_builder(TASK_NAME, build, macros=MACROS)


def register() -> tuple[str, Callable[[], None]]:
    """(the task name, cleanup): registers the builder (again, if a cleanup removed it).

    The cleanup removes the builder and the seqio task, and forgets this module so that a later
    gin `import toy_task` registers it afresh.
    """
    entry = registry.register_task_builder(TASK_NAME, build, macros=MACROS)

    def cleanup() -> None:
        import seqio

        registry.unregister_task_builder(entry)
        if TASK_NAME in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(TASK_NAME)
        sys.modules.pop(__name__, None)

    return TASK_NAME, cleanup
