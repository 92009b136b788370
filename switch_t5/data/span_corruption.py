"""T5's span-corruption objective as seqio preprocessors (arXiv 1910.10683 sec. 3.1.4).

The pipeline mirrors T5's `span_corruption` preprocessor with the same semantics:

1. `select_random_chunk`: a document longer than `max_chunk_length` (65,536) tokens keeps one
   uniformly chosen chunk of that length (stateless seed).
2. `reduce_concat_tokens`: up to 128 consecutive documents are concatenated WITHOUT separators.
3. `split_tokens`: the concatenation is cut into pieces of the raw length that yields the
   requested feature lengths (`span_corruption_lengths`); the last piece of a concatenation can
   be shorter.
4. `denoise`: a noise mask (`random_spans_noise_mask`) selects spans; in the inputs each noise
   span becomes one sentinel and in the targets each non-noise span becomes one sentinel, so the
   targets are the dropped spans each preceded by its sentinel. Sentinels count down from
   `vocab_size - 1` (`<extra_id_0>`), `vocab_size - 2` (`<extra_id_1>`), ...
5. `seqio.preprocessors.append_eos_after_trim` (added by the task) appends EOS.

Raw piece lengths for noise density 0.15 and mean span 3.0 (`span_corruption_lengths`):

    inputs length   raw tokens   targets length
    64              70           14
    128             141          29
    256             284          58
    512             568          114
    1024            1137         229
    2048            2274         456

All randomness is stateless (seeded by seqio's `map_over_dataset`), so the same seed gives the same
examples. The noise-span count uses float32 products rounded half to even exactly as T5's TF code;
`span_corruption_lengths` does the same float32 arithmetic so its prediction always matches the
mask (T5's Python helper uses float64 and can disagree with its own mask by one token at lengths
where the product sits on .5, e.g. raw length 10).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from switch_t5.data import hide_gpus_from_tf

hide_gpus_from_tf()  # tf.data runs on the host CPU only.

DEFAULT_NOISE_DENSITY = 0.15
DEFAULT_MEAN_NOISE_SPAN_LENGTH = 3.0
# T5: documents above 65,536 tokens keep one random chunk of that size.
DEFAULT_MAX_CHUNK_LENGTH = 65536
# T5 concatenates documents in batches of 128 before splitting.
DEFAULT_CONCAT_BATCH_SIZE = 128


def noise_counts(
    length: int,
    noise_density: float = DEFAULT_NOISE_DENSITY,
    mean_noise_span_length: float = DEFAULT_MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """Numbers of noise tokens and noise spans of a piece, exactly as `random_spans_noise_mask`.

    Float32 products rounded half to even; at least one noise token and one noise span, and at
    least one non-noise token (pieces shorter than 2 are treated as length 2, as in T5).

    Returns:
      (num_noise_tokens, num_noise_spans).
    """
    length = max(int(length), 2)
    num_noise_tokens = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(
        np.round(np.float32(num_noise_tokens) / np.float32(mean_noise_span_length))
    )
    return num_noise_tokens, max(num_noise_spans, 1)


def span_corruption_lengths(
    inputs_length: int,
    noise_density: float = DEFAULT_NOISE_DENSITY,
    mean_noise_span_length: float = DEFAULT_MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """The raw piece length whose corruption fills `inputs_length`, and the targets length.

    T5's `random_spans_helper`: the longest raw length whose inputs (non-noise tokens + one
    sentinel per noise span + EOS) fit in `inputs_length`; targets = noise tokens + one sentinel
    per span + EOS. Inputs 512 at density 0.15, mean span 3 -> (568, 114).

    Returns:
      (raw_tokens_length, targets_length).

    Raises:
      ValueError: if no raw length fits (inputs_length too small).
    """
    if inputs_length < 3:
        raise ValueError(f"inputs_length={inputs_length} is too small for span corruption (>= 3)")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density={noise_density} must be in (0, 1)")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length={mean_noise_span_length} must be >= 1")

    def lengths(raw: int) -> tuple[int, int]:
        noise, spans = noise_counts(raw, noise_density, mean_noise_span_length)
        return raw - noise + spans + 1, noise + spans + 1

    raw = inputs_length - 1
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    while raw > 1 and lengths(raw)[0] > inputs_length:
        raw -= 1
    targets_length = lengths(raw)[1]
    # T5's tweak: at density 0.5 make targets no longer than inputs (usually a round number).
    if noise_density == 0.5 and targets_length > inputs_length:
        raw -= 1
        targets_length -= 1
    return raw, targets_length


def random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed) -> tf.Tensor:
    """Uniformly random split of `num_items` into `num_segments` non-empty segments.

    Args:
      num_items: <int32>[] items to split (>= num_segments).
      num_segments: <int32>[] segments (>= 1).
      seed: <int32>[2] stateless seed.

    Returns:
      <int32>[num_segments] segment lengths summing to num_items.
    """
    # Choose num_segments - 1 of the num_items - 1 gaps as segment starts, uniformly.
    is_start = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
    is_start = seqio.utils.stateless_shuffle(is_start, seed)
    # [num_items - 1] -> [num_items]: the first item always opens segment 0.
    is_start = tf.pad(is_start, [[1, 0]])
    segment_id = tf.cumsum(is_start)
    return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(
    length: tf.Tensor,
    noise_density: float,
    seeds,
    mean_noise_span_length: float = DEFAULT_MEAN_NOISE_SPAN_LENGTH,
) -> tf.Tensor:
    """T5's noise mask: alternating non-noise / noise spans, starting non-noise, ending noise.

    The numbers of noise and non-noise spans are equal; the lengths within each kind are a
    uniformly random segmentation (`random_segmentation`).

    Args:
      length: <int32>[] piece length.
      noise_density: fraction of noise tokens (rounded as in `noise_counts`).
      seeds: two <int32>[2] stateless seeds (noise spans, non-noise spans).
      mean_noise_span_length: mean noise span length.

    Returns:
      <bool>[length] True where the token is noise.
    """
    orig_length = length
    length = tf.maximum(length, 2)
    # Float32, half-to-even rounding: T5's exact arithmetic (see `noise_counts`).
    num_noise_tokens = tf.cast(
        tf.math.round(tf.cast(length, tf.float32) * tf.constant(noise_density, tf.float32)),
        tf.int32,
    )
    num_noise_tokens = tf.minimum(tf.maximum(num_noise_tokens, 1), length - 1)
    num_noise_spans = tf.cast(
        tf.math.round(
            tf.cast(num_noise_tokens, tf.float32) / tf.constant(mean_noise_span_length, tf.float32)
        ),
        tf.int32,
    )
    num_noise_spans = tf.maximum(num_noise_spans, 1)
    num_nonnoise_tokens = length - num_noise_tokens
    noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans, seeds[0])
    nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens, num_noise_spans, seeds[1])
    # [spans], [spans] -> [2 * spans]: non-noise, noise, non-noise, noise, ...
    interleaved = tf.reshape(
        tf.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2]
    )
    span_starts = tf.cumsum(interleaved)[:-1]
    # [2 * spans - 1] -> [length]: 1 at every span start after the first.
    span_start_indicator = tf.math.unsorted_segment_sum(
        tf.ones_like(span_starts), span_starts, length
    )
    span_num = tf.cumsum(span_start_indicator)
    is_noise = tf.equal(span_num % 2, 1)
    return is_noise[:orig_length]


def noise_span_to_unique_sentinel(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocab_size: int
) -> tf.Tensor:
    """Replaces each run of noise tokens by one sentinel, counting down from vocab_size - 1.

    Args:
      tokens: <int32>[length] token ids.
      noise_mask: <bool>[length].
      vocab_size: the vocabulary size including extra ids; vocab_size - 1 is `<extra_id_0>`.

    Returns:
      <int32>[length - noise tokens + noise spans].
    """
    prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
    subsequent_noise = tf.logical_and(noise_mask, prev_is_noise)
    sentinel = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
    tokens = tf.where(first_noise, sentinel, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(subsequent_noise))


def nonnoise_span_to_unique_sentinel(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocab_size: int
) -> tf.Tensor:
    """The targets: each run of NON-noise tokens becomes one sentinel (see above)."""
    return noise_span_to_unique_sentinel(tokens, tf.logical_not(noise_mask), vocab_size)


@seqio.map_over_dataset(num_seeds=1)
def select_random_chunk(
    x: Mapping[str, tf.Tensor],
    seed,
    max_length: int = DEFAULT_MAX_CHUNK_LENGTH,
    feature_key: str = "targets",
) -> dict[str, tf.Tensor]:
    """Keeps one uniformly chosen `max_length` chunk of a longer document (T5)."""
    tokens = x[feature_key]
    n_tokens = tf.size(tokens)
    num_segments = tf.cast(
        tf.math.ceil(tf.cast(n_tokens, tf.float32) / tf.cast(max_length, tf.float32)), tf.int32
    )
    start = max_length * tf.random.stateless_uniform(
        [], seed=seed, maxval=tf.maximum(num_segments, 1), dtype=tf.int32
    )
    end = tf.minimum(start + max_length, n_tokens)
    return {feature_key: tokens[start:end]}


def reduce_concat_tokens(
    dataset: tf.data.Dataset,
    feature_key: str = "targets",
    batch_size: int = DEFAULT_CONCAT_BATCH_SIZE,
) -> tf.data.Dataset:
    """Concatenates `batch_size` consecutive documents without separators (T5)."""
    dataset = dataset.map(
        lambda x: {feature_key: x[feature_key]}, num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [-1]})

    def flatten(x):
        # [batch, max_doc_len] -> [sum of doc lengths]; padding id 0 never occurs in text.
        tokens = tf.reshape(x[feature_key], [-1])
        return {feature_key: tf.boolean_mask(tokens, tf.not_equal(tokens, 0))}

    return dataset.map(flatten, num_parallel_calls=tf.data.AUTOTUNE)


def split_tokens(
    dataset: tf.data.Dataset, max_tokens_per_segment: int, feature_key: str = "targets"
) -> tf.data.Dataset:
    """Cuts each token sequence into pieces of `max_tokens_per_segment` (the last may be short)."""

    def split(x):
        tokens = x[feature_key]
        # [n] -> ragged [ceil(n / L), <= L]: full pieces, then the remainder.
        pieces = tf.RaggedTensor.from_row_lengths(
            tokens, _piece_lengths(tf.size(tokens), max_tokens_per_segment)
        )
        return tf.data.Dataset.from_tensor_slices({feature_key: pieces})

    return dataset.flat_map(split)


def _piece_lengths(n: tf.Tensor, piece: int) -> tf.Tensor:
    """<int32>[ceil(n / piece)]: `piece` repeated, the last one the remainder."""
    num_full = n // piece
    rest = n - num_full * piece
    full = tf.fill([num_full], piece)
    return tf.concat([full, tf.reshape(rest, [1])[: tf.minimum(rest, 1)]], 0)


@seqio.map_over_dataset(num_seeds=2)
def denoise(
    x: Mapping[str, tf.Tensor],
    seeds,
    vocab_size: int,
    noise_density: float = DEFAULT_NOISE_DENSITY,
    mean_noise_span_length: float = DEFAULT_MEAN_NOISE_SPAN_LENGTH,
) -> dict[str, tf.Tensor]:
    """Turns a raw piece `targets` into span-corrupted `inputs` and `targets` (no EOS yet)."""
    tokens = x["targets"]
    noise_mask = random_spans_noise_mask(
        tf.size(tokens), noise_density, seeds, mean_noise_span_length
    )
    return {
        "inputs": noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size),
        "targets": nonnoise_span_to_unique_sentinel(tokens, noise_mask, vocab_size),
    }


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = DEFAULT_NOISE_DENSITY,
    mean_noise_span_length: float = DEFAULT_MEAN_NOISE_SPAN_LENGTH,
    max_chunk_length: int = DEFAULT_MAX_CHUNK_LENGTH,
    concat_batch_size: int = DEFAULT_CONCAT_BATCH_SIZE,
) -> tf.data.Dataset:
    """The seqio preprocessor: tokenized documents `targets` -> corrupted `inputs`/`targets`.

    Follow it with `seqio.preprocessors.append_eos_after_trim`. `sequence_length["inputs"]` sets
    the raw piece length (`span_corruption_lengths`); the vocabulary size used for sentinels is
    that of `output_features["targets"]` (base pieces + extra ids).
    """
    raw_length, _ = span_corruption_lengths(
        sequence_length["inputs"], noise_density, mean_noise_span_length
    )
    vocab_size = output_features["targets"].vocabulary.vocab_size
    dataset = select_random_chunk(dataset, max_length=max_chunk_length)
    dataset = reduce_concat_tokens(dataset, batch_size=concat_batch_size)
    dataset = split_tokens(dataset, raw_length)
    return denoise(
        dataset,
        vocab_size=vocab_size,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )
