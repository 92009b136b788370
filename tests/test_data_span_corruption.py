"""Span corruption: T5's lengths, mask rounding, sentinels, reconstruction, statistics, seeds."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from switch_t5.data import span_corruption as sc

VOCAB_SIZE = 1000  # Sentinels are 999, 998, ...; document tokens stay below 900.


def _features():
    vocab = seqio.PassThroughVocabulary(size=VOCAB_SIZE, eos_id=1)
    return {"targets": seqio.Feature(vocabulary=vocab, add_eos=True)}


def _documents(num_docs, seed=0, min_len=50, max_len=900):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(3, 900, size=int(rng.integers(min_len, max_len))).astype(np.int32)
        for _ in range(num_docs)
    ]


def _corrupt(docs, inputs_length=512, seed=7, **kwargs):
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    with seqio.map_seed_manager(seed):
        ds = sc.span_corruption(ds, {"inputs": inputs_length}, _features(), **kwargs)
    return [{k: v.tolist() for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def _reconstruct(inputs, targets):
    """Puts each target span back in place of its sentinel."""
    spans, current = {}, None
    for t in targets:
        if t >= VOCAB_SIZE - 100:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs:
        out.extend(spans[t] if t >= VOCAB_SIZE - 100 else [t])
    return out


@pytest.fixture(scope="module")
def corrupted():
    docs = _documents(60)
    return docs, _corrupt(docs)


def test_lengths_table():
    assert sc.span_corruption_lengths(512) == (568, 114)
    assert sc.span_corruption_lengths(128) == (141, 29)
    assert sc.span_corruption_lengths(1024) == (1137, 229)
    # Density 0.5: targets trimmed to the inputs length (T5's tweak).
    # Raw 767 would give 383 + 128 + 1 = 512 inputs but 384 + 128 + 1 = 513 targets.
    assert sc.span_corruption_lengths(512, noise_density=0.5) == (766, 512)
    with pytest.raises(ValueError, match="noise_density"):
        sc.span_corruption_lengths(512, noise_density=1.5)
    with pytest.raises(ValueError, match="inputs_length"):
        sc.span_corruption_lengths(2)


def test_noise_counts_round_half_to_even_in_float32():
    # float32(10) * float32(0.15) = 1.5000001 -> 2 (float64 would give 1.4999999 -> 1).
    assert sc.noise_counts(10) == (2, 1)
    # 568 * 0.15 = 85.2 -> 85 noise tokens; 85 / 3 = 28.33 -> 28 spans.
    assert sc.noise_counts(568) == (85, 28)
    # 30 * 0.15 = 4.5 -> 4 (half to even); at least one noise token and span.
    assert sc.noise_counts(30) == (4, 1)
    assert sc.noise_counts(1) == (1, 1)


def test_mask_structure_matches_counts():
    for length in [*range(2, 60), 141, 568, 1137]:
        for seed in (0, 1):
            seeds = [tf.constant([seed, length]), tf.constant([length, seed + 5])]
            mask = sc.random_spans_noise_mask(tf.constant(length), 0.15, seeds, 3.0).numpy()
            noise, spans = sc.noise_counts(length)
            assert mask.shape == (length,)
            assert mask.sum() == noise, length
            starts = np.flatnonzero(mask & ~np.pad(mask[:-1], (1, 0)))
            assert len(starts) == spans, length
            assert not mask[0] and mask[-1], "starts with non-noise, ends with noise"


def test_random_segmentation_is_uniform():
    # 5 items in 2 non-empty segments: 4 equally likely first-segment lengths.
    firsts = [
        int(sc.random_segmentation(tf.constant(5), tf.constant(2), tf.constant([s, 3]))[0])
        for s in range(800)
    ]
    counts = np.bincount(firsts, minlength=5)[1:]
    assert counts.sum() == 800 and counts.min() > 0
    np.testing.assert_allclose(counts / 800, 0.25, atol=0.05)
    lengths = sc.random_segmentation(tf.constant(50), tf.constant(7), tf.constant([1, 2])).numpy()
    assert lengths.sum() == 50 and len(lengths) == 7 and lengths.min() >= 1


def test_full_pieces_have_t5_lengths_and_sentinel_order(corrupted):
    _, examples = corrupted
    full = examples[:-1]  # Only the last piece of the concatenation can be short.
    assert len(full) > 20
    for ex in full:
        # Without EOS (added by append_eos_after_trim): 511 + 1 = 512, 113 + 1 = 114.
        assert len(ex["inputs"]) == 511 and len(ex["targets"]) == 113
        sentinels = [t for t in ex["inputs"] if t >= VOCAB_SIZE - 100]
        assert sentinels == list(range(VOCAB_SIZE - 1, VOCAB_SIZE - 29, -1))
        target_sentinels = [t for t in ex["targets"] if t >= VOCAB_SIZE - 100]
        assert target_sentinels == sentinels
        assert ex["targets"][0] == VOCAB_SIZE - 1  # Targets start with <extra_id_0>.
        assert ex["inputs"][-1] == sentinels[-1]  # The mask ends with noise.


def test_reconstruction_gives_documents_concatenated_without_separators(corrupted):
    docs, examples = corrupted
    rebuilt = np.concatenate([_reconstruct(ex["inputs"], ex["targets"]) for ex in examples])
    np.testing.assert_array_equal(rebuilt, np.concatenate(docs))
    assert all(len(_reconstruct(e["inputs"], e["targets"])) == 568 for e in examples[:-1])


def test_noise_statistics(corrupted):
    _, examples = corrupted
    noise_tokens = spans = total = 0
    span_lengths = []
    for ex in examples[:-1]:
        run = None
        for t in ex["targets"]:
            if t >= VOCAB_SIZE - 100:
                if run is not None:
                    span_lengths.append(run)
                run = 0
                spans += 1
            else:
                run += 1
                noise_tokens += 1
        span_lengths.append(run)
        total += len(_reconstruct(ex["inputs"], ex["targets"]))
    assert noise_tokens / total == pytest.approx(85 / 568, abs=1e-12)
    assert np.mean(span_lengths) == pytest.approx(85 / 28, abs=1e-12)
    # Span lengths are random, not all equal to the mean.
    assert 1 in span_lengths and max(span_lengths) >= 8


def test_same_seed_same_examples_other_seed_differs(corrupted):
    docs, examples = corrupted
    assert _corrupt(docs) == examples
    other = _corrupt(docs, seed=8)
    assert other != examples
    assert [len(e["inputs"]) for e in other] == [len(e["inputs"]) for e in examples]


def test_concatenation_batches_and_long_documents():
    # Two batches of 3 documents: each batch ends in its own short piece.
    docs = _documents(6, seed=3, min_len=100, max_len=101)
    examples = _corrupt(docs, inputs_length=128, concat_batch_size=3)
    raw = [len(_reconstruct(e["inputs"], e["targets"])) for e in examples]
    assert raw == [141, 141, 18, 141, 141, 18]
    # A document above max_chunk_length keeps one of its chunks [0, 300), [300, 600), [600, 880).
    long_doc = np.arange(3, 883, dtype=np.int32)
    starts = set()
    for seed in range(6):
        examples = _corrupt([long_doc], inputs_length=128, seed=seed, max_chunk_length=300)
        rebuilt = np.concatenate([_reconstruct(e["inputs"], e["targets"]) for e in examples])
        start = int(rebuilt[0]) - 3
        assert start in (0, 300, 600)
        np.testing.assert_array_equal(rebuilt, long_doc[start : start + 300])
        starts.add(start)
    assert len(starts) > 1
