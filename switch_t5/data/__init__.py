"""Data: vocabularies, span corruption, seqio tasks and the input pipeline.

TensorFlow and seqio are imported only inside this package (and lazily by its TF-free modules:
`readers`, `vocab`, `corpus`), so the model and the train step never load TensorFlow. Every
module that imports TensorFlow calls `hide_gpus_from_tf()` right after importing it: tf.data runs
on the host CPU and must never reserve accelerator memory that JAX needs. No module here imports
gin (`switch_t5.data_gin` is the gin edge).
"""

from __future__ import annotations

import logging

_HIDDEN = False


def hide_gpus_from_tf() -> None:
    """Makes TensorFlow see no GPU (idempotent; call before TensorFlow runs any op)."""
    global _HIDDEN
    if _HIDDEN:
        return
    import tensorflow as tf

    from switch_t5 import console

    try:
        with console.native_stderr_filtered():  # no `failed call to cuInit` line on a CPU host
            tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # TF already initialised its devices.
        logging.warning("could not hide GPUs from TensorFlow (%s); it may reserve GPU memory", e)
    _HIDDEN = True
