"""Tests of switch_t5.decoding: toy callbacks first (no model), then a tiny real EncoderDecoder."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_t5 import decoding

# ----------------------------------------------------------------------------------------------
# Toy models: logits from a table indexed by the last two tokens (the older one kept in the
# cache, so a beam search that reorders the cache wrongly gets the wrong logits) and by the
# example id (also in the cache, so mixing rows of different examples is caught).
# ----------------------------------------------------------------------------------------------


def _markov_table(seed, examples, vocab, scale=1.5):
    """<float32>[examples, vocab (token before previous), vocab (previous), vocab (next)]."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(examples, vocab, vocab, vocab)) * scale
    # Like a trained model, PAD is (almost) never predicted; it stays possible for enumeration.
    table[..., decoding.PAD_ID] -= 20.0
    return table.astype(np.float32)


def _markov_cache(num_examples, rows_per_example):
    example = np.repeat(np.arange(num_examples), rows_per_example).astype(np.int32)
    return {
        "example": jnp.asarray(example),
        "prev": jnp.zeros(example.shape, jnp.int32),  # the decoder start token
        "cache_index": jnp.array(0, jnp.int32),
    }


def _markov_tokens_to_logits(table):
    table = jnp.asarray(table)

    def tokens_to_logits(state):
        cache = state.cache
        logits = table[cache["example"], cache["prev"], state.cur_token]
        new_cache = {
            "example": cache["example"],
            "prev": state.cur_token,
            "cache_index": cache["cache_index"] + 1,
        }
        return logits, new_cache

    return tokens_to_logits


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()


def _sequence_log_prob(table, example, tokens, eos_id=decoding.EOS_ID):
    """Log-probability of one output (through its EOS) and its length, in float64."""
    prev2, prev, total, length = 0, 0, 0.0, 0
    for token in tokens:
        total += _log_softmax(table[example, prev2, prev])[token]
        length += 1
        if token == eos_id:
            break
        prev2, prev = prev, token
    return total, length


def _all_outputs(vocab, length, eos_id=decoding.EOS_ID):
    """Every distinct output of the given length: token strings cut after EOS, PAD after."""
    outputs = set()
    for tokens in itertools.product(range(vocab), repeat=length):
        tokens = list(tokens)
        if eos_id in tokens:
            end = tokens.index(eos_id) + 1
            tokens = tokens[:end] + [decoding.PAD_ID] * (length - end)
        outputs.add(tuple(tokens))
    return sorted(outputs)


def _reference_greedy(table, example, length):
    tokens, prev2, prev = [], 0, 0
    for _ in range(length):
        token = int(np.argmax(table[example, prev2, prev]))
        tokens.append(token)
        if token == decoding.EOS_ID:
            break
        prev2, prev = prev, token
    return tokens + [decoding.PAD_ID] * (length - len(tokens))


def _brevity(alpha, length):
    return ((5.0 + length) / 6.0) ** alpha


# ----------------------------------------------------------------------------------------------
# Greedy.
# ----------------------------------------------------------------------------------------------

BATCH, VOCAB, LENGTH = 3, 5, 6


@pytest.fixture(scope="module")
def markov():
    # Seed 2: greedy never ends, ends at step 1, and at step 0 (checked in the test).
    return _markov_table(2, BATCH, VOCAB)


@functools.cache
def _jit_greedy(length):
    return jax.jit(
        lambda table, cache: decoding.greedy_decode(
            _markov_tokens_to_logits(table),
            cache,
            batch_size=cache["prev"].shape[0],
            max_decode_length=length,
        )
    )


def test_greedy_matches_reference_and_log_probs(markov):
    seqs, log_probs = _jit_greedy(LENGTH)(markov, _markov_cache(BATCH, 1))
    seqs, log_probs = np.asarray(seqs), np.asarray(log_probs)
    assert seqs.shape == (BATCH, LENGTH) and seqs.dtype == np.int32
    ends = [np.flatnonzero(seqs[b] == decoding.EOS_ID).tolist() for b in range(BATCH)]
    assert ends == [[], [1], [0]], "the fixture should cover early, immediate and no EOS"
    for b in range(BATCH):
        assert seqs[b].tolist() == _reference_greedy(markov, b, LENGTH)
        expected, _ = _sequence_log_prob(markov, b, seqs[b])
        np.testing.assert_allclose(log_probs[b], expected, rtol=1e-5, atol=1e-6)


def test_greedy_stops_early_and_pads():
    """All rows emit EOS at step 2: the loop makes exactly 3 calls and PAD fills the rest."""
    calls = []

    def tokens_to_logits(state):
        jax.debug.callback(lambda i: calls.append(int(i)), state.cur_index)
        # Token 2 + row until step 2, then EOS.
        rows = jnp.arange(4)
        best = jnp.where(state.cur_index == 2, decoding.EOS_ID, 2 + rows)
        logits = jax.nn.one_hot(best, 8) * 5.0
        return logits, state.cache

    seqs, _ = jax.jit(
        lambda: decoding.greedy_decode(tokens_to_logits, {}, batch_size=4, max_decode_length=7)
    )()
    jax.effects_barrier()
    assert calls == [0, 1, 2]
    expected = [[2 + r, 2 + r, 1, 0, 0, 0, 0] for r in range(4)]
    assert np.asarray(seqs).tolist() == expected


def test_greedy_bad_logits_shape_is_a_clear_error():
    def tokens_to_logits(state):
        return jnp.zeros((2, 1, 8)), state.cache

    with pytest.raises(ValueError, match=r"logits of shape \(2, 1, 8\)"):
        decoding.greedy_decode(tokens_to_logits, {}, batch_size=2, max_decode_length=3)


# ----------------------------------------------------------------------------------------------
# Beam search.
# ----------------------------------------------------------------------------------------------


@functools.cache
def _jit_beam(num_beams, length, alpha):
    def run(table, cache):
        return decoding.beam_search(
            _markov_tokens_to_logits(table),
            cache,
            batch_size=cache["prev"].shape[0] // num_beams,
            num_beams=num_beams,
            max_decode_length=length,
            alpha=alpha,
        )

    return jax.jit(run)


def test_beam_one_equals_greedy(markov):
    greedy, greedy_lp = _jit_greedy(LENGTH)(markov, _markov_cache(BATCH, 1))
    beams, scores = _jit_beam(1, LENGTH, 0.0)(markov, _markov_cache(BATCH, 1))
    assert beams.shape == (BATCH, 1, LENGTH) and scores.shape == (BATCH, 1)
    np.testing.assert_array_equal(beams[:, 0], greedy)
    np.testing.assert_allclose(scores[:, 0], greedy_lp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_is_exact_with_enough_beams(alpha):
    """k = V ** (l - 1) beams never prune, so the best sequence is the enumerated optimum."""
    vocab, length, examples = 3, 4, 4
    num_beams = vocab ** (length - 1)
    table = _markov_table(7, examples, vocab)
    beams, scores = _jit_beam(num_beams, length, alpha)(table, _markov_cache(examples, num_beams))
    beams, scores = np.asarray(beams), np.asarray(scores)
    outputs = _all_outputs(vocab, length)
    best_lengths = set()
    for b in range(examples):
        scored = []
        for tokens in outputs:
            log_prob, n = _sequence_log_prob(table, b, tokens)
            scored.append((log_prob / _brevity(alpha, n), tokens))
        scored.sort(reverse=True)
        assert scored[0][0] - scored[1][0] > 1e-4, "enumerated optimum must be unique"
        assert tuple(beams[b, 0]) == scored[0][1]
        np.testing.assert_allclose(scores[b, 0], scored[0][0], rtol=1e-5, atol=1e-6)
        best_lengths.add(int(np.sum(beams[b, 0] != decoding.PAD_ID)))
        # Every returned beam is a distinct output scored right, best first; with this many beams
        # they are exactly the k best outputs.
        expected = scored[:num_beams]
        assert [tuple(x) for x in beams[b]] == [t for _, t in expected]
        np.testing.assert_allclose(scores[b], [sc for sc, _ in expected], rtol=1e-5, atol=1e-6)
    assert len(best_lengths) > 1, "the examples should end at different lengths"


def test_beam_scores_are_consistent_and_sorted(markov):
    """A small beam: each returned beam's score is its own penalised log-probability."""
    num_beams, alpha = 4, 0.6
    beams, scores = _jit_beam(num_beams, LENGTH, alpha)(markov, _markov_cache(BATCH, num_beams))
    beams, scores = np.asarray(beams), np.asarray(scores)
    for b in range(BATCH):
        assert np.all(np.diff(scores[b]) <= 0)
        assert len({tuple(x) for x in beams[b]}) == num_beams
        for j in range(num_beams):
            log_prob, n = _sequence_log_prob(markov, b, beams[b, j])
            np.testing.assert_allclose(
                scores[b, j], log_prob / _brevity(alpha, n), rtol=1e-5, atol=1e-6
            )
            # PAD only after EOS, and the cut is at the first EOS.
            tail = beams[b, j, n:]
            assert np.all(tail == decoding.PAD_ID)


def test_beam_cache_with_wrong_rows_is_a_clear_error(markov):
    with pytest.raises(ValueError, match=r"cache leaf \['example'\].*batch \* beams"):
        decoding.beam_search(
            _markov_tokens_to_logits(markov),
            _markov_cache(BATCH, 1),
            batch_size=BATCH,
            num_beams=2,
            max_decode_length=3,
        )


# ----------------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------------


@functools.cache
def _jit_sample(length, temperature, top_k, top_p):
    def run(table, cache, rng):
        return decoding.temperature_sample(
            _markov_tokens_to_logits(table),
            cache,
            rng,
            batch_size=cache["prev"].shape[0],
            max_decode_length=length,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )

    return jax.jit(run)


def test_sampling_at_tiny_temperature_is_greedy(markov):
    # Sampling (not the argmax shortcut below 1e-4) at T = 2e-4: a runner-up whose logit is
    # more than 0.02 lower has probability below exp(-100).
    gaps = np.diff(np.sort(markov, axis=-1)[..., -2:], axis=-1)
    assert gaps.min() > 0.02
    greedy, greedy_lp = _jit_greedy(LENGTH)(markov, _markov_cache(BATCH, 1))
    for seed in range(3):
        seqs, lp = _jit_sample(LENGTH, 2e-4, 0, 0.0)(
            markov, _markov_cache(BATCH, 1), jax.random.PRNGKey(seed)
        )
        np.testing.assert_array_equal(seqs, greedy)
        np.testing.assert_allclose(lp, greedy_lp, rtol=1e-5, atol=1e-6)
    seqs, _ = _jit_sample(LENGTH, 0.0, 0, 0.0)(
        markov, _markov_cache(BATCH, 1), jax.random.PRNGKey(0)
    )
    np.testing.assert_array_equal(seqs, greedy)


def test_sampling_is_deterministic_for_a_fixed_rng(markov):
    run = _jit_sample(LENGTH, 1.0, 0, 0.0)
    cache = _markov_cache(16, 1)
    table = np.repeat(markov[:1], 16, axis=0)
    a = run(table, cache, jax.random.PRNGKey(3))
    b = run(table, cache, jax.random.PRNGKey(3))
    c = run(table, cache, jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # The returned log-probability is the model's own (temperature 1, no truncation).
    for row in range(16):
        expected, _ = _sequence_log_prob(table, row, np.asarray(a[0][row]))
        np.testing.assert_allclose(a[1][row], expected, rtol=1e-5, atol=1e-6)


def _fixed_logits_model(logits):
    logits = jnp.asarray(logits, jnp.float32)

    def tokens_to_logits(state):
        rows = state.cur_token.shape[0]
        return jnp.broadcast_to(logits, (rows, logits.shape[0])), state.cache

    return tokens_to_logits


def _sample_fixed(logits, rows, length, **kwargs):
    return jax.jit(
        lambda rng: decoding.temperature_sample(
            _fixed_logits_model(logits),
            {},
            rng,
            batch_size=rows,
            max_decode_length=length,
            **kwargs,
        )
    )(jax.random.PRNGKey(0))[0]


# 8 tokens, EOS made impossible so every step samples; probabilities well separated.
_FIXED = np.log(np.array([1e-30, 1e-30, 0.30, 0.22, 0.16, 0.12, 0.11, 0.09]))


def test_sampling_follows_the_tempered_distribution():
    """Frequencies over 4096 x 4 draws match softmax(logits / T) within 5 standard errors."""
    temperature, rows, length = 2.0, 4096, 4
    seqs = np.asarray(_sample_fixed(_FIXED, rows, length, temperature=temperature))
    probs = np.exp(_log_softmax(_FIXED / temperature))
    counts = np.bincount(seqs.ravel(), minlength=8) / seqs.size
    stderr = np.sqrt(probs * (1 - probs) / seqs.size)
    assert np.all(np.abs(counts - probs) <= 5 * stderr + 1e-12), (counts, probs)


def test_top_k_restricts_to_the_k_best():
    seqs = np.asarray(_sample_fixed(_FIXED, 512, 3, temperature=1.0, top_k=3))
    assert set(np.unique(seqs)) == {2, 3, 4}


def test_top_p_keeps_the_smallest_nucleus():
    # Masses 0.30, 0.22, 0.16: the first two hold 0.52 < 0.6, so the third is needed too.
    seqs = np.asarray(_sample_fixed(_FIXED, 512, 3, temperature=1.0, top_p=0.6))
    assert set(np.unique(seqs)) == {2, 3, 4}
    seqs = np.asarray(_sample_fixed(_FIXED, 512, 3, temperature=1.0, top_p=0.5))
    assert set(np.unique(seqs)) == {2, 3}
    seqs = np.asarray(_sample_fixed(_FIXED, 512, 3, temperature=1.0, top_k=3, top_p=0.5))
    assert set(np.unique(seqs)) == {2, 3}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
        ({"top_k": -2}, "top_k=-2 must be >= 0"),
        ({"top_p": 1.5}, r"top_p=1.5 must be in \[0, 1\]"),
        ({"top_k": 9}, "top_k=9 exceeds the vocabulary size 8"),
    ],
)
def test_sampling_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        decoding.temperature_sample(
            _fixed_logits_model(_FIXED),
            {},
            jax.random.PRNGKey(0),
            batch_size=2,
            max_decode_length=2,
            **kwargs,
        )
