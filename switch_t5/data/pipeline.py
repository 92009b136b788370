"""The input pipeline: seqio task -> EncDec features -> global batches, with exact resume.

One global stream. Every host builds the same deterministic tf.data pipeline (seqio's
`EncDecFeatureConverter`, packed for training) and batches it into GLOBAL batches; a host keeps
rows `[host_index * b, (host_index + 1) * b)` with `b = global_batch_size // num_hosts`. So the
global batch at step N is the same whatever the number of hosts, and a run can restart on a
different number of hosts and see the same data. (The price: every host tokenizes and packs the
whole global batch. On 2 CPU cores the embedded task gives ~10^5 tokens/s, see
scripts/bench_input.py; for pods whose hosts cannot each afford that, pre-process the task once
with seqio's cache, see the README.)

Exact resume: `get_state()` returns a JSON-serialisable dict holding the step and the tf.data
iterator checkpoint (TensorFlow's own iterator serialisation: shuffle buffers, packing state and
the positions in the source files, base64-encoded). `set_state()` restores it, so the stream
continues at step N without re-reading anything before it, and a restarted run sees exactly the
batches an uninterrupted one would. The state is host-independent (taken before host slicing).

Features (T5X's EncDec names), numpy `[global_batch_size // num_hosts, length]`:
  encoder_input_tokens, encoder_segment_ids, encoder_positions <int32>[b, inputs_length]
  decoder_input_tokens, decoder_target_tokens, decoder_segment_ids, decoder_positions
      <int32>[b, targets_length]
  decoder_loss_weights <int32>[b, targets_length] (1 on real target tokens)
Unpacked (pack=False) batches carry the same eight keys: segment ids are 1 on real tokens and 0
on padding, positions are 0..length-1 on real tokens. With repeat=False the last batch is padded
with all-zero rows (zero loss weights), so every batch has the static shape and no example is
dropped; the number of batches is fixed for a task, split and lengths.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from switch_t5.data import features, hide_gpus_from_tf, tasks

hide_gpus_from_tf()  # tf.data runs on the host CPU only.

FEATURE_KEYS = features.FEATURE_KEYS  # the one list lives in switch_t5.data.features
_STATE_VERSION = 1


def _default_host() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


class InputPipeline:
    """Iterator of host-local batches of one global, deterministic, resumable stream.

    Args:
      task_or_mixture_name: a registered seqio task or mixture.
      split: dataset split ("train", "validation", ...).
      feature_lengths: task feature lengths, e.g. {"inputs": 512, "targets": 114}; checked by
        `tasks.check_lengths` (positive integers, and no target of the task cut).
      global_batch_size: examples per global batch (divisible by num_hosts).
      seed: shuffling and preprocessing seed (same seed, same stream).
      shuffle: shuffle examples (seqio's shuffle buffer) and source files.
      pack: pack several examples per row (training); False gives one example per row.
      repeat: repeat forever; False gives one deterministic pass (eval).
      host_index: this host's index (default jax.process_index()).
      num_hosts: number of hosts (default jax.process_count()).
      use_cached: read seqio's offline cache of the task (see the README).

    Iterating yields dicts of numpy arrays (see the module docstring).
    """

    def __init__(
        self,
        task_or_mixture_name: str,
        split: str,
        feature_lengths: Mapping[str, int],
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        pack: bool = True,
        repeat: bool = True,
        host_index: int | None = None,
        num_hosts: int | None = None,
        use_cached: bool = False,
    ):
        if host_index is None or num_hosts is None:
            default_index, default_hosts = _default_host()
            host_index = default_index if host_index is None else host_index
            num_hosts = default_hosts if num_hosts is None else num_hosts
        if num_hosts < 1 or not 0 <= host_index < num_hosts:
            raise ValueError(f"host_index={host_index} must be in [0, num_hosts={num_hosts})")
        if global_batch_size < 1 or global_batch_size % num_hosts:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"num_hosts={num_hosts}"
            )
        self.task_or_mixture_name = task_or_mixture_name
        self.split = split
        # Refuses bad lengths, and lengths that would cut the task's targets, before TF builds
        # anything.
        self.feature_lengths = tasks.check_lengths(task_or_mixture_name, split, feature_lengths)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.pack = pack
        self.repeat = repeat
        self.host_index = host_index
        self.num_hosts = num_hosts
        self.use_cached = use_cached
        self.local_batch_size = global_batch_size // num_hosts
        # Built on first use, so a refused `set_state` or a config check costs nothing.
        self._dataset: tf.data.Dataset | None = None
        self._iterator = None
        self._step = 0

    def _ensure_dataset(self) -> tf.data.Dataset:
        if self._dataset is None:
            self._dataset = self._build_dataset()
        return self._dataset

    def _build_dataset(self) -> tf.data.Dataset:
        ds = seqio.get_dataset(
            self.task_or_mixture_name,
            task_feature_lengths=self.feature_lengths,
            feature_converter=seqio.EncDecFeatureConverter(pack=self.pack),
            dataset_split=self.split,
            use_cached=self.use_cached,
            shuffle=self.shuffle,
            num_epochs=None if self.repeat else 1,
            seed=self.seed,
            shard_info=None,  # One global stream; hosts slice batches (module docstring).
            verbose=False,
        )
        ds = ds.batch(self.global_batch_size, drop_remainder=self.repeat)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(2)

    @property
    def step(self) -> int:
        """Global batches consumed so far (the training step of the next batch)."""
        return self._step

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = iter(self._ensure_dataset())
        batch = {k: np.asarray(v) for k, v in next(self._iterator).items()}
        self._step += 1
        batch = self._complete(batch)
        lo = self.host_index * self.local_batch_size
        return {k: v[lo : lo + self.local_batch_size] for k, v in batch.items()}

    def _complete(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pads a short last batch with zero rows; adds segment ids/positions when unpacked."""
        rows = batch["encoder_input_tokens"].shape[0]
        if rows < self.global_batch_size:
            batch = {
                k: np.pad(v, [(0, self.global_batch_size - rows), (0, 0)]) for k, v in batch.items()
            }
        if "encoder_segment_ids" not in batch:
            for prefix, tokens in (
                ("encoder", batch["encoder_input_tokens"]),
                ("decoder", batch["decoder_target_tokens"]),
            ):
                segment = (tokens != 0).astype(np.int32)
                batch[f"{prefix}_segment_ids"] = segment
                # [length] -> [batch, length]
                positions = np.arange(tokens.shape[1], dtype=np.int32)[None, :]
                batch[f"{prefix}_positions"] = positions * segment
        return {k: batch[k].astype(np.int32) for k in FEATURE_KEYS}

    def reset(self) -> None:
        """Starts the stream again from step 0 (e.g. before each evaluation pass)."""
        self._iterator = None
        self._step = 0

    def _config(self) -> dict:
        return {
            "task_or_mixture_name": self.task_or_mixture_name,
            "split": self.split,
            "feature_lengths": self.feature_lengths,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "pack": self.pack,
            "repeat": self.repeat,
        }

    def get_state(self) -> dict:
        """JSON-serialisable state: the step, the pipeline settings and the iterator checkpoint."""
        if self._iterator is None:
            self._iterator = iter(self._ensure_dataset())
        checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        with tempfile.TemporaryDirectory() as tmp:
            prefix = checkpoint.write(os.path.join(tmp, "iterator"))
            files = {}
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    files[name] = base64.b64encode(f.read()).decode("ascii")
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "config": self._config(),
            "prefix": os.path.basename(prefix),
            "files": files,
        }

    def set_state(self, state: Mapping) -> None:
        """Continues the stream where `get_state` was taken (any host index and host count).

        Raises:
          ValueError: if the state comes from a pipeline with other settings (task, split,
            lengths, global batch size, seed, shuffle, pack, repeat), naming the differences.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"input-pipeline state version {state.get('version')!r} is not "
                f"{_STATE_VERSION}; it was written by another version of switch_t5"
            )
        ours = self._config()
        theirs = dict(state["config"])
        diffs = [
            f"{k}: saved {theirs.get(k)!r}, now {v!r}"
            for k, v in ours.items()
            if theirs.get(k) != v
        ]
        if diffs:
            raise ValueError(
                "cannot resume the input pipeline: its settings changed since the state was "
                "saved (" + "; ".join(diffs) + "). Restore the original data settings, or "
                "start the data stream afresh."
            )
        iterator = iter(self._ensure_dataset())
        checkpoint = tf.train.Checkpoint(iterator=iterator)
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in state["files"].items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(base64.b64decode(data))
            checkpoint.read(os.path.join(tmp, state["prefix"])).assert_consumed()
        self._iterator = iterator
        self._step = int(state["step"])


def num_batches(pipeline: InputPipeline) -> int:
    """Counts the batches of a finite (repeat=False) pipeline, then resets it."""
    if pipeline.repeat:
        raise ValueError("num_batches needs a finite pipeline (repeat=False)")
    pipeline.reset()
    n = sum(1 for _ in pipeline)
    pipeline.reset()
    return n
