"""Tests of switch_t5.decoding: toy callbacks first (no model), then a tiny real EncoderDecoder."""

import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from switch_t5 import decoding, network, partitioning
from switch_t5.config import SwitchConfig

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


# ----------------------------------------------------------------------------------------------
# A tiny real Switch model (float32, capacity that drops nothing).
# ----------------------------------------------------------------------------------------------

# Odd sizes (embed 8, head_dim 3, mlp 16, 4 experts); one sparse layer in each stack. Capacity
# factor 4.0 = num_experts gives every expert room for all tokens of a group, so no token is
# ever dropped and a single decoding step (4 tokens) routes exactly like the full sequence. Untied
# logits: a random tied model mostly repeats its input token, which would hide cache bugs.
TINY = SwitchConfig(
    vocab_size=40,
    d_model=8,
    num_heads=2,
    head_dim=3,
    d_ff=16,
    num_encoder_layers=1,
    num_decoder_layers=2,
    num_experts=4,
    encoder_sparse_layers=(0,),
    decoder_sparse_layers=(1,),
    logits_via_embedding=False,
    dropout_rate=0.0,
    router_jitter_noise=0.0,
    eval_capacity_factor=4.0,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dtype="float32",
)
DECODE_LENGTH = 6
# Different real lengths, padding included.
ENCODER_TOKENS = np.array(
    [
        [5, 6, 7, 8, 9, 10, 11],
        [12, 13, 14, 0, 0, 0, 0],
        [3, 3, 3, 3, 3, 0, 0],
        [2, 39, 0, 0, 0, 0, 0],
    ],
    np.int32,
)


def _random_params(config):
    """Unit-variance random params (a fresh init is too close to uniform to decode anything).

    Kernels N(0, 1 / fan_in), embeddings N(0, 1), norm scales 1; EOS's output column is a copy of
    token 10's, scaled by 1.02, so that some sequences end (row 2 of ENCODER_TOKENS).
    """
    abstract = network.init_abstract(config, inputs_length=7, targets_length=DECODE_LENGTH)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if "scale" in name:
            return np.ones(x.shape, np.float32)
        std = 1.0 if "embedding" in name else 1.0 / np.sqrt(x.shape[-2])
        return (rng.normal(size=x.shape) * std).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(abstract["params"]))
    kernel = params["decoder"]["logits_dense"]["kernel"]
    kernel[:, decoding.EOS_ID] = 1.02 * kernel[:, 10]
    return params


@pytest.fixture(scope="module")
def tiny():
    model = network.EncoderDecoder(TINY)
    params = _random_params(TINY)

    @jax.jit
    def forward(params, targets):
        """Logits <float32>[16, l, v] and the MoE token drop fractions of a forward pass; row
        r of targets <int32>[16, l] belongs to example r // 4 (beam-minor, as beam search)."""
        encoder_tokens = np.repeat(ENCODER_TOKENS, 4, axis=0)
        decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
        logits, state = model.apply(
            {"params": params},
            encoder_tokens,
            decoder_inputs,
            enable_dropout=False,
            mutable=["intermediates"],
        )
        dropped = [
            v for p, v in jax.tree_util.tree_leaves_with_path(state)
            if "fraction_dropped" in jax.tree_util.keystr(p)
        ]  # fmt: skip
        return logits, dropped

    def teacher_forced(targets):
        """<float32>[n, l, v] log-probabilities for n = 4 (one row per example) or 16 targets,
        and whether the MoE layers dropped any token (one compiled shape for both)."""
        targets = np.asarray(targets)
        one_per_example = targets.shape[0] == len(ENCODER_TOKENS)
        if one_per_example:
            targets = np.repeat(targets, 4, axis=0)
        logits, dropped = forward(params, targets)
        log_probs = np.asarray(jax.nn.log_softmax(logits))
        any_dropped = any(float(np.max(d)) > 0.0 for d in dropped)
        assert dropped, "the forward pass should report the MoE layers' dropped fraction"
        return (log_probs[::4] if one_per_example else log_probs), any_dropped

    def decode(method, **kwargs):
        fn = jax.jit(functools.partial(decoding.decode_batch, model, method=method, **kwargs))
        return fn(params, {"encoder_input_tokens": ENCODER_TOKENS})

    return model, params, teacher_forced, decode


@functools.cache
def _greedy_output(decode):
    return decode("greedy", max_decode_length=DECODE_LENGTH)


BEAMS, ALPHA = 4, 0.6


@functools.cache
def _beam_output(decode):
    return decode("beam", max_decode_length=DECODE_LENGTH, num_beams=BEAMS, alpha=ALPHA)


def _ends(tokens):
    """Lengths through the first EOS (the full length when there is none)."""
    tokens = np.asarray(tokens)
    has_eos = (tokens == decoding.EOS_ID).any(-1)
    return np.where(has_eos, np.argmax(tokens == decoding.EOS_ID, -1) + 1, tokens.shape[-1])


def test_model_greedy_equals_teacher_forced_argmax(tiny):
    teacher_forced, decode = tiny[2:]
    out = _greedy_output(decode)
    tokens = np.asarray(out.tokens)
    log_probs, dropped = teacher_forced(tokens)
    assert not dropped
    ends = _ends(tokens)
    assert ends.tolist() == [6, 6, 5, 6], "row 2 should end with EOS (see _random_params)"
    assert len(np.unique(tokens)) > 4, f"degenerate decode {tokens}"
    top2 = np.sort(log_probs, -1)[..., -2:]
    for b, n in enumerate(ends):
        # The argmax is well separated, so float32 rounding cannot flip it.
        assert np.min(top2[b, :n, 1] - top2[b, :n, 0]) > 1e-3
        np.testing.assert_array_equal(tokens[b, :n], np.argmax(log_probs[b, :n], -1))
        assert np.all(tokens[b, n:] == decoding.PAD_ID)
        expected = log_probs[b, np.arange(n), tokens[b, :n]].sum()
        np.testing.assert_allclose(out.scores[b], expected, rtol=1e-5, atol=1e-6)


def test_model_beams_are_scored_by_the_teacher_forced_model(tiny):
    """Every beam's score is its teacher-forced log-probability / length penalty: the KV cache
    followed the beams through every reordering."""
    teacher_forced, decode = tiny[2:]
    out = _beam_output(decode)
    beams = np.asarray(out.beams)
    assert beams.shape == (len(ENCODER_TOKENS), BEAMS, DECODE_LENGTH)
    np.testing.assert_array_equal(out.tokens, beams[:, 0])
    np.testing.assert_array_equal(out.scores, np.asarray(out.beam_scores)[:, 0])
    flat = beams.reshape(-1, DECODE_LENGTH)
    log_probs, dropped = teacher_forced(flat)
    assert not dropped
    ends = _ends(flat)
    assert len(set(ends.tolist())) > 1, "beams should end at different lengths"
    expected = np.array(
        [
            log_probs[r, np.arange(n), flat[r, :n]].sum() / _brevity(ALPHA, n)
            for r, n in enumerate(ends)
        ]
    ).reshape(-1, BEAMS)
    np.testing.assert_allclose(out.beam_scores, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(np.asarray(out.beam_scores), axis=1) <= 0)
    # The best beam is at least as good as greedy under the same score.
    greedy = _greedy_output(decode)
    greedy_scores = np.asarray(greedy.scores) / _brevity(ALPHA, _ends(greedy.tokens))
    assert np.all(np.asarray(out.scores) >= greedy_scores - 1e-6)


def test_model_top_k_samples_are_seeded_and_among_the_k_best(tiny):
    teacher_forced, decode = tiny[2:]
    kwargs = dict(max_decode_length=DECODE_LENGTH, temperature=1.0, top_k=3)
    a = decode("sample", rng=jax.random.PRNGKey(0), **kwargs)
    b = decode("sample", rng=jax.random.PRNGKey(0), **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.scores, b.scores)
    tokens = np.asarray(a.tokens)
    assert not np.array_equal(tokens, np.asarray(_greedy_output(decode).tokens))
    log_probs, _ = teacher_forced(tokens)
    top3 = np.argsort(log_probs, -1)[..., -3:]
    for row, n in enumerate(_ends(tokens)):
        assert all(tokens[row, t] in top3[row, t] for t in range(n))
        expected = log_probs[row, np.arange(n), tokens[row, :n]].sum()
        np.testing.assert_allclose(a.scores[row], expected, rtol=1e-5, atol=1e-6)


def test_decode_batch_bad_arguments_are_clear_errors(tiny):
    model, params = tiny[:2]
    batch = {"encoder_input_tokens": ENCODER_TOKENS}
    with pytest.raises(ValueError, match="method='topk': use 'greedy', 'sample' or 'beam'"):
        decoding.decode_batch(model, params, batch, method="topk", max_decode_length=3)
    with pytest.raises(ValueError, match="method='sample' needs rng"):
        decoding.decode_batch(model, params, batch, method="sample", max_decode_length=3)
    with pytest.raises(ValueError, match="needs 'encoder_input_tokens'"):
        decoding.decode_batch(model, params, {"inputs": ENCODER_TOKENS}, max_decode_length=3)


def test_model_decoding_on_the_mesh_matches_one_device(tiny, mesh_222):
    """Sharded params and activations on the (2, 2, 2) mesh decode the same tokens."""
    model, params, _, decode = tiny
    abstract = network.init_abstract(TINY, inputs_length=7, targets_length=DECODE_LENGTH)
    sharded = jax.device_put(params, partitioning.params_shardings(abstract, mesh_222)["params"])
    tokens = jax.device_put(ENCODER_TOKENS, partitioning.batch_sharding(mesh_222))
    with jax.set_mesh(mesh_222), partitioning.axis_rules():
        for method, ref in (("greedy", _greedy_output(decode)), ("beam", _beam_output(decode))):
            out = jax.jit(
                functools.partial(
                    decoding.decode_batch,
                    model,
                    method=method,
                    max_decode_length=DECODE_LENGTH,
                    num_beams=BEAMS,
                    alpha=ALPHA,
                )
            )(sharded, {"encoder_input_tokens": tokens})
            np.testing.assert_array_equal(out.tokens, ref.tokens)
            np.testing.assert_allclose(out.scores, ref.scores, rtol=1e-5, atol=1e-6)


def test_decoding_config_lists_every_problem():
    with pytest.raises(decoding.DecodingConfigError) as info:
        decoding.DecodingConfig(
            method="topk", max_decode_length=0, num_beams=0, temperature=-1.0, top_k=-2, top_p=1.5
        )
    message = str(info.value)
    for part in (
        "method='topk': use 'greedy', 'sample' or 'beam'",
        "max_decode_length=0 must be positive",
        "num_beams=0 must be positive",
        "temperature=-1.0 must be >= 0",
        "top_k=-2 must be >= 0",
        "top_p=1.5 must be in [0, 1]",
    ):
        assert part in message, part
    assert message.count(";") == 5


def test_decoding_config_fills_the_length_and_gives_decode_batch_its_arguments():
    import dataclasses
    import inspect

    config = decoding.DecodingConfig(method="beam", num_beams=2, alpha=0.0)
    assert config.with_default_length(7).max_decode_length == 7
    assert config.with_default_length(7).with_default_length(9).max_decode_length == 7
    with pytest.raises(decoding.DecodingConfigError, match="max_decode_length is not set"):
        config.decode_kwargs()
    kwargs = config.with_default_length(7).decode_kwargs()
    assert kwargs["method"] == "beam" and kwargs["num_beams"] == 2 and kwargs["alpha"] == 0.0
    # Every setting but the seed (a caller's rng) is a decode_batch argument of the same name.
    params = inspect.signature(decoding.decode_batch).parameters
    assert set(kwargs) <= set(params)
    fields = {f.name for f in dataclasses.fields(decoding.DecodingConfig)}
    assert set(kwargs) == fields - {"seed"}
    assert set(decoding.FLAG_TYPES) == fields


def test_entry_points_take_the_decoding_settings_by_their_names():
    """infer and evaluate keep their gin/flag names, which are DecodingConfig's field names, with
    its defaults (infer decodes 64 tokens by default, eval the targets length)."""
    import dataclasses
    import inspect

    from switch_t5 import eval as eval_lib
    from switch_t5 import infer

    defaults = {f.name: f.default for f in dataclasses.fields(decoding.DecodingConfig)}
    for fn, own in ((infer.infer, {"max_decode_length": 64}), (eval_lib.run_eval, {})):
        params = inspect.signature(fn.__wrapped__).parameters
        for name, default in {**defaults, **own}.items():
            assert params[name].default == default, (fn.__name__, name)


def test_a_bad_decoding_setting_fails_before_any_checkpoint_is_read(tmp_path):
    from switch_t5 import infer

    with pytest.raises(decoding.DecodingConfigError, match=r"top_p=2\.0 must be in \[0, 1\]"):
        infer.infer(checkpoint_dir=str(tmp_path / "missing"), inputs=["a"], top_p=2.0)
