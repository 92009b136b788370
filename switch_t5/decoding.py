"""Autoregressive decoding on a KV cache: greedy, temperature / top-k / top-p sampling, beam search.

The algorithms are model-agnostic: they drive a `tokens_to_logits(state) -> (logits, new_cache)`
callback one position at a time inside a `lax.while_loop` (so they are jittable and stop early once
every sequence has emitted EOS). `decode_batch` binds them to `switch_t5.network.EncoderDecoder`:
it runs the encoder once, builds the decoder's KV cache and decodes.

T5 conventions: token 0 is PAD and also the decoder start token, token 1 is EOS. Position `i` of an
output holds the token predicted from the tokens before it; after EOS a sequence holds PAD only.

Shape letters: b = batch, k = beams, l = max decode length, v = vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from switch_t5 import errors, moe, train_state

PyTree = Any

PAD_ID = 0
DECODER_START_ID = 0  # T5 starts the decoder with PAD.
EOS_ID = 1
# A finite "minus infinity" for masked scores: sums and ratios of it never become NaN.
NEG_INF = -1.0e7
# Below this temperature sampling is argmax: dividing logits by ~0 would overflow.
MIN_TEMPERATURE = 1e-4


@flax.struct.dataclass
class DecodingState:
    """What `tokens_to_logits` sees at one decoding step.

    Attributes:
      cur_index: <int32>[] the position being predicted (0 for the first output token).
      cur_token: <int32>[batch*] the token at position cur_index - 1 (the decoder start token when
        cur_index is 0): the decoder input of this step.
      sequences: <int32>[batch*, max_decode_length] the tokens decoded so far (PAD beyond).
      cache: the model's cache pytree (for a flax model, its "cache" collection).
    """

    cur_index: jax.Array
    cur_token: jax.Array
    sequences: jax.Array
    cache: PyTree


# (state) -> (logits <float32>[batch*, vocab], new cache). batch* = batch (x beams for beam search).
TokensToLogits = Callable[[DecodingState], tuple[jax.Array, PyTree]]


def _check_logits(logits: jax.Array, rows: int) -> jax.Array:
    if logits.ndim != 2 or logits.shape[0] != rows:
        raise ValueError(
            f"tokens_to_logits returned logits of shape {logits.shape}; expected "
            f"[{rows}, vocab] (one row per decoded sequence, the length axis squeezed)"
        )
    return logits.astype(jnp.float32)


def _cur_token(sequences: jax.Array, index: jax.Array) -> jax.Array:
    """<int32>[n] the decoder input at step `index`: the previous token, or the start token."""
    # [n, l] -> [n]
    previous = lax.dynamic_index_in_dim(
        sequences, jnp.maximum(index - 1, 0), axis=1, keepdims=False
    )
    return jnp.where(index == 0, DECODER_START_ID, previous).astype(jnp.int32)


def _check_lengths(batch_size: int, max_decode_length: int) -> None:
    if batch_size <= 0:
        raise errors.UserError(f"batch_size={batch_size} must be positive")
    if max_decode_length <= 0:
        raise errors.UserError(f"max_decode_length={max_decode_length} must be positive")


# ----------------------------------------------------------------------------------------------
# Greedy decoding and sampling.
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class _SampleLoopState:
    step: jax.Array  # <int32>[]
    sequences: jax.Array  # <int32>[b, l]
    ended: jax.Array  # <bool>[b]
    log_probs: jax.Array  # <float32>[b]
    cache: PyTree
    rng: jax.Array


def _sample_loop(
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    batch_size: int,
    max_decode_length: int,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
    rng: jax.Array,
    eos_id: int,
    cache_batch_axis: int,
) -> tuple[jax.Array, jax.Array]:
    """One token per step from `choose(logits, rng) -> <int32>[b]` until EOS or the length."""
    _check_lengths(batch_size, max_decode_length)
    _map_cache_rows(lambda leaf: leaf, cache, batch_size, cache_batch_axis)  # fail early, clearly

    def cond(s: _SampleLoopState) -> jax.Array:
        return (s.step < max_decode_length) & ~jnp.all(s.ended)

    def body(s: _SampleLoopState) -> _SampleLoopState:
        state = DecodingState(
            cur_index=s.step,
            cur_token=_cur_token(s.sequences, s.step),
            sequences=s.sequences,
            cache=s.cache,
        )
        logits, new_cache = tokens_to_logits(state)
        logits = _check_logits(logits, batch_size)
        # fold_in, not split: step t of a run draws the same numbers whatever the loop did before.
        token = choose(logits, jax.random.fold_in(s.rng, s.step)).astype(jnp.int32)
        # [b, v] -> [b]: the log-probability of the chosen token under the model itself.
        token_log_prob = jnp.take_along_axis(
            jax.nn.log_softmax(logits), token[:, None], axis=1
        ).squeeze(1)
        token = jnp.where(s.ended, PAD_ID, token)
        log_probs = s.log_probs + jnp.where(s.ended, 0.0, token_log_prob)
        # [b, l] with column `step` set to token.
        sequences = lax.dynamic_update_slice_in_dim(s.sequences, token[:, None], s.step, axis=1)
        return _SampleLoopState(
            step=s.step + 1,
            sequences=sequences,
            ended=s.ended | (token == eos_id),
            log_probs=log_probs,
            cache=new_cache,
            rng=s.rng,
        )

    init = _SampleLoopState(
        step=jnp.array(0, jnp.int32),
        sequences=jnp.full((batch_size, max_decode_length), PAD_ID, jnp.int32),
        ended=jnp.zeros((batch_size,), bool),
        log_probs=jnp.zeros((batch_size,), jnp.float32),
        cache=cache,
        rng=rng,
    )
    final = lax.while_loop(cond, body, init)
    return final.sequences, final.log_probs


def greedy_decode(
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    *,
    batch_size: int,
    max_decode_length: int,
    eos_id: int = EOS_ID,
    cache_batch_axis: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Argmax decoding (ties go to the lowest token id).

    Args:
      tokens_to_logits: the model's one-step function (see `DecodingState`).
      cache: the initial cache for `batch_size` sequences.
      batch_size: number of sequences.
      max_decode_length: output length l.
      eos_id: the end-of-sequence token; PAD follows it.
      cache_batch_axis: the axis of the cache leaves that holds the b sequences.

    Returns:
      sequences: <int32>[b, l] decoded tokens, PAD after EOS.
      log_probs: <float32>[b] the model's log-probability of each sequence (through its EOS).
    """
    # Sampling at temperature 0 takes the argmax and draws nothing from the key.
    return temperature_sample(
        tokens_to_logits,
        cache,
        jax.random.PRNGKey(0),
        batch_size=batch_size,
        max_decode_length=max_decode_length,
        temperature=0.0,
        eos_id=eos_id,
        cache_batch_axis=cache_batch_axis,
    )


def _sampling_fn(
    temperature: float, top_k: int, top_p: float
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The per-step token choice of `temperature_sample`."""

    def choose(logits: jax.Array, rng: jax.Array) -> jax.Array:
        vocab = logits.shape[-1]
        if top_k > vocab:
            raise errors.UserError(
                f"top_k={top_k} exceeds the vocabulary size {vocab}; use top_k<={vocab}"
            )
        if temperature < MIN_TEMPERATURE:
            return jnp.argmax(logits, axis=-1)
        scaled = logits / temperature
        if not top_k and not top_p:
            return jax.random.categorical(rng, scaled, axis=-1)
        # [b, v] -> [b, k'] the best k' logits, sorted descending, and their token ids.
        best, best_ids = lax.top_k(scaled, top_k or vocab)
        if top_p:
            # Nucleus (Holtzman et al. 2019): keep the smallest prefix of the sorted tokens whose
            # probability reaches top_p; a token stays when the mass before it is below top_p,
            # so the most likely token always stays.
            probs = jax.nn.softmax(best, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            best = jnp.where(mass_before < top_p, best, NEG_INF)
        # [b, k'] -> [b] index into the kept tokens -> token id.
        pick = jax.random.categorical(rng, best, axis=-1)
        return jnp.take_along_axis(best_ids, pick[:, None], axis=1).squeeze(1)

    return choose


def temperature_sample(
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    rng: jax.Array,
    *,
    batch_size: int,
    max_decode_length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    eos_id: int = EOS_ID,
    cache_batch_axis: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Ancestral sampling from softmax(logits / temperature), optionally truncated.

    Args:
      tokens_to_logits: the model's one-step function (see `DecodingState`).
      cache: the initial cache for `batch_size` sequences.
      rng: PRNG key; the same key gives the same samples.
      batch_size: number of sequences.
      max_decode_length: output length l.
      temperature: >= 0; below 1e-4 sampling becomes argmax (greedy).
      top_k: sample among the k most likely tokens only; 0 = no limit.
      top_p: sample among the smallest set of most likely tokens whose probability (after the
        temperature and top-k) reaches top_p; 0 = off (T5X convention), in [0, 1].
      eos_id: the end-of-sequence token; PAD follows it.
      cache_batch_axis: the axis of the cache leaves that holds the b sequences.

    Returns:
      sequences: <int32>[b, l] sampled tokens, PAD after EOS.
      log_probs: <float32>[b] log-probability of each sequence under the model's own distribution
        (temperature 1, no truncation), so samples can be scored or reranked.
    """
    if not temperature >= 0.0:
        raise errors.UserError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise errors.UserError(f"top_k={top_k} must be >= 0 (0 = no top-k limit)")
    if not 0.0 <= top_p <= 1.0:
        raise errors.UserError(f"top_p={top_p} must be in [0, 1] (0 = off)")
    choose = _sampling_fn(float(temperature), int(top_k), float(top_p))
    return _sample_loop(
        tokens_to_logits,
        cache,
        batch_size,
        max_decode_length,
        choose,
        rng,
        eos_id,
        cache_batch_axis,
    )


# ----------------------------------------------------------------------------------------------
# Beam search.
# ----------------------------------------------------------------------------------------------


def brevity_penalty(alpha: float, length: jax.Array | int) -> jax.Array:
    """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016, arXiv 1609.08144 eq. 14)."""
    return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def expand_beams(x: jax.Array, num_beams: int) -> jax.Array:
    """[b, ...] -> [b * k, ...]: each example repeated k times in a row (beam-minor order)."""
    return jnp.repeat(x, num_beams, axis=0)


def _is_cache_index(path: tuple) -> bool:
    last = path[-1] if path else None
    name = getattr(last, "key", getattr(last, "name", None))
    return name == "cache_index"


def _map_cache_rows(fn: Callable, cache: PyTree, num_rows: int, batch_axis: int) -> PyTree:
    """Applies fn to every cache leaf that holds one row per sequence, after checking its rows."""

    def apply(path, leaf):
        if _is_cache_index(path) or jnp.ndim(leaf) == 0:
            return leaf
        if jnp.ndim(leaf) <= batch_axis or leaf.shape[batch_axis] != num_rows:
            raise ValueError(
                f"cache leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, expected "
                f"{num_rows} sequences on axis {batch_axis}; build the cache for batch * beams "
                "sequences (batch for greedy and sampling), or set cache_batch_axis to the axis "
                "that holds them"
            )
        return fn(leaf)

    return jax.tree_util.tree_map_with_path(apply, cache)


def gather_cache(cache: PyTree, rows: jax.Array, num_rows: int, batch_axis: int = 0) -> PyTree:
    """Reorders the sequences of a cache: row j of the result is row rows[j] of the input.

    Args:
      cache: pytree whose array leaves hold one row per sequence on `batch_axis`; scalar leaves
        and leaves named "cache_index" (one shared position) are left as they are.
      rows: <int32>[n] source rows.
      num_rows: the size the batch axis must have (checked, to catch a wrong `batch_axis`).
      batch_axis: the sequence axis of the leaves (1 when layers are stacked in front).
    """

    return _map_cache_rows(
        lambda leaf: jnp.take(leaf, rows, axis=batch_axis), cache, num_rows, batch_axis
    )


@flax.struct.dataclass
class _BeamState:
    cur_index: jax.Array  # <int32>[]
    live_log_probs: jax.Array  # <float32>[b, k] sorted best first; NEG_INF = empty slot
    live_seqs: jax.Array  # <int32>[b, k, l]
    finished_scores: jax.Array  # <float32>[b, k] length-penalised; NEG_INF = empty slot
    finished_seqs: jax.Array  # <int32>[b, k, l]
    finished_flags: jax.Array  # <bool>[b, k]
    cache: PyTree  # rows b * k, beam-minor


def _take_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: [b, n, ...], idx: <int32>[b, m] -> [b, m, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _top_candidates(
    live_log_probs: jax.Array, live_seqs: jax.Array, log_probs: jax.Array, i: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The best 2k one-token extensions of the k live beams (fewer when k * v < 2k).

    Args:
      live_log_probs: <float32>[b, k] the live beams' log-probabilities.
      live_seqs: <int32>[b, k, l] the live beams.
      log_probs: <float32>[b, k, v] the next token's log-probabilities after each beam.
      i: <int32>[] the position being decoded.

    Returns:
      top_lp: <float32>[b, 2k] the candidates' log-probabilities, best first.
      top_beam: <int32>[b, 2k] the live beam each one extends.
      top_token: <int32>[b, 2k] the token it adds.
      top_seqs: <int32>[b, 2k, l] the candidates, position i holding the new token.
    """
    b, k, vocab = log_probs.shape
    length = live_seqs.shape[-1]
    candidates = live_log_probs[:, :, None] + log_probs
    # [b, k, v] -> [b, k * v] -> [b, 2k]
    num_candidates = min(2 * k, k * vocab)
    top_lp, top_idx = lax.top_k(candidates.reshape(b, k * vocab), num_candidates)
    top_beam, top_token = top_idx // vocab, top_idx % vocab
    # [b, k, l] -> [b, 2k, l] with position i set to the new token.
    top_seqs = _take_beams(live_seqs, top_beam)
    top_seqs = jnp.where(jnp.arange(length) == i, top_token[:, :, None], top_seqs)
    return top_lp, top_beam, top_token, top_seqs


def _merge_finished(
    s: _BeamState, top_seqs: jax.Array, new_scores: jax.Array, finishing: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best k of the finished set and this step's ending candidates (scores, seqs, flags).

    new_scores: <float32>[b, 2k] length-penalised, NEG_INF where `finishing` is False.
    """
    k = s.finished_scores.shape[1]
    # [b, k] + [b, 2k] -> [b, 3k] -> [b, k]
    all_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
    all_seqs = jnp.concatenate([s.finished_seqs, top_seqs], axis=1)
    all_flags = jnp.concatenate([s.finished_flags, finishing], axis=1)
    finished_scores, finished_pick = lax.top_k(all_scores, k)
    return (
        finished_scores,
        _take_beams(all_seqs, finished_pick),
        jnp.take_along_axis(all_flags, finished_pick, axis=1),
    )


def _beam_step(
    s: _BeamState,
    tokens_to_logits: TokensToLogits,
    *,
    alpha: float,
    eos_id: int,
    cache_batch_axis: int,
) -> _BeamState:
    """One position of `beam_search`: extend, keep the best k live beams, merge the ended ones."""
    i = s.cur_index
    b, k, length = s.live_seqs.shape
    # [b, k, l] -> [b * k, l]
    flat_seqs = s.live_seqs.reshape(b * k, length)
    state = DecodingState(
        cur_index=i, cur_token=_cur_token(flat_seqs, i), sequences=flat_seqs, cache=s.cache
    )
    logits, new_cache = tokens_to_logits(state)
    logits = _check_logits(logits, b * k)
    # [b * k, v] -> [b, k, v]
    log_probs = jax.nn.log_softmax(logits).reshape(b, k, logits.shape[-1])
    top_lp, top_beam, top_token, top_seqs = _top_candidates(
        s.live_log_probs, s.live_seqs, log_probs, i
    )

    # Candidates grown from an empty slot carry ~NEG_INF: never keep them.
    valid = top_lp > NEG_INF / 2
    ends = (top_token == eos_id) | (i == length - 1)
    in_top_k = jnp.arange(top_lp.shape[1]) < k

    # Live: the best k candidates that do not end.
    live_lp = jnp.where(valid & ~ends, top_lp, NEG_INF)
    new_live_lp, live_pick = lax.top_k(live_lp, k)
    new_live_seqs = _take_beams(top_seqs, live_pick)
    # [b, k] source rows of the flat b * k cache.
    src_beam = jnp.take_along_axis(top_beam, live_pick, axis=1)
    rows = (jnp.arange(b)[:, None] * k + src_beam).reshape(b * k)
    new_cache = gather_cache(new_cache, rows, b * k, cache_batch_axis)

    # Finished: merge the candidates that end here into the best k so far.
    finishing = valid & ends & in_top_k
    new_scores = jnp.where(finishing, top_lp / brevity_penalty(alpha, i + 1), NEG_INF)
    finished_scores, finished_seqs, finished_flags = _merge_finished(
        s, top_seqs, new_scores, finishing
    )
    return _BeamState(
        cur_index=i + 1,
        live_log_probs=new_live_lp,
        live_seqs=new_live_seqs,
        finished_scores=finished_scores,
        finished_seqs=finished_seqs,
        finished_flags=finished_flags,
        cache=new_cache,
    )


def _beam_continue(s: _BeamState, alpha: float) -> jax.Array:
    """<bool>[]: positions remain and some live beam could still beat its worst finished one."""
    length = s.live_seqs.shape[-1]
    # [b] the best score a live beam could still finish with.
    penalty = jnp.maximum(brevity_penalty(alpha, s.cur_index + 1), brevity_penalty(alpha, length))
    best_reachable = s.live_log_probs[:, 0] / penalty
    worst_finished = jnp.where(s.finished_flags[:, -1], s.finished_scores[:, -1], NEG_INF)
    done = s.finished_flags[:, -1] & (worst_finished > best_reachable)
    return (s.cur_index < length) & ~jnp.all(done)


def _initial_beam_state(cache: PyTree, b: int, k: int, length: int) -> _BeamState:
    """Only beam 0 is live at the start: the k copies of the start token are one prefix."""
    init_live = jnp.full((b, k), NEG_INF, jnp.float32).at[:, 0].set(0.0)
    return _BeamState(
        cur_index=jnp.array(0, jnp.int32),
        live_log_probs=init_live,
        live_seqs=jnp.full((b, k, length), PAD_ID, jnp.int32),
        finished_scores=jnp.full((b, k), NEG_INF, jnp.float32),
        finished_seqs=jnp.full((b, k, length), PAD_ID, jnp.int32),
        finished_flags=jnp.zeros((b, k), bool),
        cache=cache,
    )


def beam_search(
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    *,
    batch_size: int,
    num_beams: int,
    max_decode_length: int,
    alpha: float = 0.6,
    eos_id: int = EOS_ID,
    cache_batch_axis: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with the GNMT length penalty, on a cache of batch * beams sequences.

    Each step extends the k live beams by every token, keeps the best 2k candidates (so k can
    stay live even when k of them end), moves candidates that end (EOS, or the last position)
    into the finished set with score log_prob / ((5 + length) / 6) ** alpha, and keeps the best k
    that do not end as live beams, reordering the cache to follow them. As in fairseq and Hugging
    Face, an ending candidate counts only if it ranks among the k best candidates of its step:
    with one beam this is exactly greedy decoding. The loop stops early once no live beam can
    beat the worst of k finished ones (log-probabilities only fall; the penalty is bounded by
    its value at the longest reachable length).

    With alpha = 0 and k >= V ** (l - 1) nothing is ever pruned, and the result is the exact best
    sequence (tested against enumeration).

    Args:
      tokens_to_logits: the model's one-step function (see `DecodingState`); it sees b * k rows,
        row b_i * k + k_i being beam k_i of example b_i.
      cache: the initial cache for b * k sequences (e.g. encoder outputs repeated with
        `expand_beams`, KV cache built for b * k rows).
      batch_size: number of examples b.
      num_beams: beams per example k.
      max_decode_length: output length l.
      alpha: length-penalty exponent (T5X default 0.6; 0 = plain log-probability).
      eos_id: the end-of-sequence token; PAD follows it.
      cache_batch_axis: the axis of the cache leaves that holds the b * k sequences.

    Returns:
      sequences: <int32>[b, k, l] finished sequences, best first, PAD after EOS.
      scores: <float32>[b, k] their length-penalised log-probabilities (NEG_INF marks an empty
        slot, possible only when fewer than k distinct sequences exist).
    """
    _check_lengths(batch_size, max_decode_length)
    if num_beams <= 0:
        raise errors.UserError(f"num_beams={num_beams} must be positive")
    b, k, length = batch_size, num_beams, max_decode_length
    _map_cache_rows(lambda leaf: leaf, cache, b * k, cache_batch_axis)  # fail early, clearly
    final = lax.while_loop(
        functools.partial(_beam_continue, alpha=alpha),
        functools.partial(
            _beam_step,
            tokens_to_logits=tokens_to_logits,
            alpha=alpha,
            eos_id=eos_id,
            cache_batch_axis=cache_batch_axis,
        ),
        _initial_beam_state(cache, b, k, length),
    )
    return final.finished_seqs, final.finished_scores


# ----------------------------------------------------------------------------------------------
# Model binding.
# ----------------------------------------------------------------------------------------------

DecodeMethod = Literal["greedy", "sample", "beam"]


DECODE_METHODS = ("greedy", "sample", "beam")


class DecodingConfigError(errors.UserError):
    """A DecodingConfig field is invalid; lists every problem."""


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
    """How to decode: the ONE home of the settings that infer, eval and training samples share.

    The entry points keep their own parameter names, which are these field names
    (`switch_t5.infer.method`, `switch_t5.evaluate.num_beams`, infer's `--top_k`, ...).

    Attributes:
      method: "greedy", "sample" (temperature / top-k / top-p) or "beam".
      max_decode_length: output tokens; None = the caller's default (eval: the targets length).
      num_beams: beams per example (beam only).
      alpha: length-penalty exponent, ((5 + length) / 6) ** alpha (beam only; 0 = plain
        log-probability).
      temperature: sampling temperature (sample only; 0 = greedy).
      top_k: sample among the k most likely tokens, 0 = all (sample only).
      top_p: nucleus sampling mass, 0 = off (sample only).
      seed: the sampling seed (sample only); a caller's batch i uses fold_in(key(seed), i).
    """

    method: DecodeMethod = "greedy"
    max_decode_length: int | None = None
    num_beams: int = 4
    alpha: float = 0.6
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.method not in DECODE_METHODS:
            problems.append(f"method={self.method!r}: use 'greedy', 'sample' or 'beam'")
        if self.max_decode_length is not None and not _positive_int(self.max_decode_length):
            problems.append(f"max_decode_length={self.max_decode_length!r} must be positive")
        if not _positive_int(self.num_beams):
            problems.append(f"num_beams={self.num_beams!r} must be positive")
        if not errors.is_number(self.alpha):
            problems.append(f"alpha={self.alpha!r} must be a number")
        if not errors.is_number(self.temperature) or self.temperature < 0:
            problems.append(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not errors.is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} must be >= 0 (0 = no top-k limit)")
        if not errors.is_number(self.top_p) or not 0 <= self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in [0, 1] (0 = off)")
        if not errors.is_int(self.seed):
            problems.append(f"seed={self.seed!r} must be an integer")
        if problems:
            raise DecodingConfigError("Invalid decoding settings: " + "; ".join(problems))

    def with_default_length(self, max_decode_length: int) -> DecodingConfig:
        """This config with `max_decode_length` filled in where it is None."""
        if self.max_decode_length is not None:
            return self
        return dataclasses.replace(self, max_decode_length=max_decode_length)

    def decode_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `decode_batch` (all but the rng)."""
        if self.max_decode_length is None:
            raise DecodingConfigError(
                "max_decode_length is not set: give it (e.g. --max_decode_length=N)"
            )
        return {
            "method": self.method,
            "max_decode_length": self.max_decode_length,
            "num_beams": self.num_beams,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
        }


# The command-line type of each DecodingConfig field (infer's --method, --num_beams, ...).
FLAG_TYPES: dict[str, type] = {
    "method": str,
    "max_decode_length": int,
    "num_beams": int,
    "alpha": float,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
}


def _positive_int(value: Any) -> bool:
    return errors.is_int(value) and value > 0


class DecodeOutput(NamedTuple):
    """What `decode_batch` returns.

    Attributes:
      tokens: <int32>[batch, max_decode_length] the decoded (best beam's) tokens, EOS then PAD.
      scores: <float32>[batch] greedy and sample: the model's log-probability of `tokens`; beam:
        the length-penalised score of the best beam.
      beams: <int32>[batch, num_beams, max_decode_length] every finished beam, best first (beam
        search only; None otherwise).
      beam_scores: <float32>[batch, num_beams] their scores (beam search only; None otherwise).
      fraction_dropped: <float32>[] the encoder's MoE drops: dropped (token, expert) choices /
        real ones, averaged over its sparse layers (0 for a dense model). Decoding steps are not
        counted: with per-sequence routing groups (`SwitchConfig.for_inference`, transformers'
        `expert_capacity`) a step's group is its one token, which is never dropped.
    """

    tokens: jax.Array
    scores: jax.Array
    beams: jax.Array | None = None
    beam_scores: jax.Array | None = None
    fraction_dropped: jax.Array | None = None


def _model_cache(
    model: nn.Module, params: PyTree, encoded: jax.Array, encoder_tokens: jax.Array, length: int
) -> PyTree:
    """A zero KV cache for encoded.shape[0] sequences, shaped by tracing the model (no FLOPs)."""
    rows = encoded.shape[0]

    def cache_of(params, encoded, encoder_tokens):
        # The first decode=True call on full-length inputs creates the "cache" collection.
        _, variables = model.apply(
            train_state.model_variables(params),
            encoded,
            encoder_tokens,
            jnp.zeros((rows, length), jnp.int32),
            enable_dropout=False,
            decode=True,
            max_decode_length=length,
            mutable=["cache"],
            method="decode",
        )
        return variables["cache"]

    shapes = jax.eval_shape(cache_of, params, encoded, encoder_tokens)
    # T5X / flax attention caches start as zeros with cache_index 0.
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode_batch(
    model: nn.Module,
    params: PyTree,
    batch: Mapping[str, jax.Array],
    *,
    method: DecodeMethod = "greedy",
    max_decode_length: int,
    num_beams: int = 4,
    alpha: float = 0.6,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    rng: jax.Array | None = None,
    eos_id: int = EOS_ID,
) -> DecodeOutput:
    """Decodes a batch with an encoder-decoder on its KV cache (T5X `predict_batch`).

    Runs the encoder once, builds a zero decoder cache for batch (x beams) sequences, repeats
    the encoder outputs over the beams and decodes one token per step; dropout is off and MoE
    layers route by the model's config with the eval capacity factor (inference builds the
    model from `SwitchConfig.for_inference()`: each sequence its own routing group). Jittable
    with every argument but `params`, `batch` and `rng` static, e.g.
    `jax.jit(functools.partial(decode_batch, model, method="beam", max_decode_length=32))`.
    Under a mesh, call it inside `nn.logical_axis_rules(...)` like the model itself.

    Args:
      model: a `switch_t5.network.EncoderDecoder` (or a module with the same `encode` and
        `decode(..., decode=True, max_decode_length=...)` methods and "cache" collection).
      params: the model's params (boxed or not).
      batch: features; reads `encoder_input_tokens` <int32>[batch, inputs_length] (0 = PAD).
        Packed inputs are not supported.
      method: "greedy", "sample" (temperature / top-k / top-p) or "beam".
      max_decode_length: output length l.
      num_beams: beams per example (beam only).
      alpha: length-penalty exponent (beam only; 0 = plain log-probability).
      temperature: sampling temperature (sample only; 0 = greedy).
      top_k: sample among the k most likely tokens, 0 = all (sample only).
      top_p: nucleus sampling mass, 0 = off (sample only).
      rng: PRNG key (sample only, required there).
      eos_id: the end-of-sequence token.

    Returns:
      A `DecodeOutput`.
    """
    encoder_tokens = _encoder_tokens(method, rng, batch)
    params = nn.meta.unbox(params)
    batch_size = encoder_tokens.shape[0]
    beams = num_beams if method == "beam" else 1
    encoded, encoder_tokens, fraction_dropped = _encode(model, params, encoder_tokens, beams)
    cache = _model_cache(model, params, encoded, encoder_tokens, max_decode_length)
    tokens_to_logits = _decoder_step_fn(model, params, encoded, encoder_tokens, max_decode_length)
    output = _search(
        method,
        tokens_to_logits,
        cache,
        batch_size=batch_size,
        max_decode_length=max_decode_length,
        num_beams=num_beams,
        alpha=alpha,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        rng=rng,
        eos_id=eos_id,
    )
    return output._replace(fraction_dropped=fraction_dropped)


def _encoder_tokens(
    method: str, rng: jax.Array | None, batch: Mapping[str, jax.Array]
) -> jax.Array:
    """<int32>[b, inputs_length] the batch's encoder tokens, after checking the request."""
    if method not in ("greedy", "sample", "beam"):
        raise errors.UserError(f"method={method!r}: use 'greedy', 'sample' or 'beam'")
    if method == "sample" and rng is None:
        raise ValueError("method='sample' needs rng=jax.random.key(seed) (samples must be seeded)")
    if "encoder_input_tokens" not in batch:
        raise ValueError(
            f"batch has features {sorted(batch)}; decoding needs 'encoder_input_tokens'"
        )
    encoder_tokens = jnp.asarray(batch["encoder_input_tokens"], jnp.int32)
    if encoder_tokens.ndim != 2:
        raise ValueError(
            f"encoder_input_tokens must be [batch, inputs_length], got shape {encoder_tokens.shape}"
        )
    return encoder_tokens


def _encode(
    model: nn.Module, params: PyTree, encoder_tokens: jax.Array, beams: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs the encoder once and repeats its outputs over the beams (beam-minor rows).

    Returns:
      encoded: [b * beams, inputs_length, embed] encoder outputs.
      encoder_tokens: <int32>[b * beams, inputs_length].
      fraction_dropped: <float32>[] the encoder's MoE drops (see `DecodeOutput`).
    """
    # [b, inputs_length] -> [b, inputs_length, embed]
    encoded, sown = model.apply(
        train_state.model_variables(params),
        encoder_tokens,
        enable_dropout=False,
        method="encode",
        mutable=["intermediates"],
    )
    fraction_dropped = moe.collect_moe_intermediates(sown.get("intermediates", {}))[
        "fraction_dropped"
    ]
    if beams > 1:
        # [b, ...] -> [b * k, ...], beam-minor like the beam search's rows.
        encoded = expand_beams(encoded, beams)
        encoder_tokens = expand_beams(encoder_tokens, beams)
    return encoded, encoder_tokens, fraction_dropped


def _decoder_step_fn(
    model: nn.Module,
    params: PyTree,
    encoded: jax.Array,
    encoder_tokens: jax.Array,
    max_decode_length: int,
) -> TokensToLogits:
    """The model's `tokens_to_logits`: one decoder position on the KV cache."""

    def tokens_to_logits(state: DecodingState) -> tuple[jax.Array, PyTree]:
        # [rows] -> [rows, 1] decoder input -> [rows, 1, vocab] logits -> [rows, vocab]
        logits, variables = model.apply(
            {**train_state.model_variables(params), "cache": state.cache},
            encoded,
            encoder_tokens,
            state.cur_token[:, None],
            enable_dropout=False,
            decode=True,
            max_decode_length=max_decode_length,
            mutable=["cache"],
            method="decode",
        )
        return logits[:, 0, :], variables["cache"]

    return tokens_to_logits


def _search(
    method: DecodeMethod,
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    *,
    batch_size: int,
    max_decode_length: int,
    num_beams: int,
    alpha: float,
    temperature: float,
    top_k: int,
    top_p: float,
    rng: jax.Array | None,
    eos_id: int,
) -> DecodeOutput:
    """Runs the decoding `method` asks for (see `decode_batch`); fraction_dropped left None."""
    if method == "greedy":
        tokens, scores = greedy_decode(
            tokens_to_logits,
            cache,
            batch_size=batch_size,
            max_decode_length=max_decode_length,
            eos_id=eos_id,
        )
        return DecodeOutput(tokens, scores)
    if method == "sample":
        tokens, scores = temperature_sample(
            tokens_to_logits,
            cache,
            rng,
            batch_size=batch_size,
            max_decode_length=max_decode_length,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
        )
        return DecodeOutput(tokens, scores)
    all_beams, beam_scores = beam_search(
        tokens_to_logits,
        cache,
        batch_size=batch_size,
        num_beams=num_beams,
        max_decode_length=max_decode_length,
        alpha=alpha,
        eos_id=eos_id,
    )
    return DecodeOutput(all_beams[:, 0], beam_scores[:, 0], all_beams, beam_scores)
