"""Inference entry point: run a checkpoint on new inputs and print its outputs.

    python -m switch_t5.infer --checkpoint_dir=/tmp/rte_finetune \\
      --input="rte sentence1: Ann is tall. sentence2: Ann is short."
    python -m switch_t5.infer --checkpoint_dir=/tmp/rte_finetune/checkpoints/2000 \\
      --input_file=inputs.txt --output_file=outputs.jsonl --method=beam --num_beams=4

`--checkpoint_dir` is a MODEL_DIR (its latest step, or `--step`), its checkpoints/ folder or one
step's folder. The model config comes from the checkpoint (`switch_t5.SwitchConfig.*` gin
bindings override fields such as `eval_capacity_factor`); the vocabulary is the one the
checkpoint records, or `--vocabulary_path` / the VOCABULARY_PATH macro (checked against the
checkpoint's hash). `--input_file` holds one input per line; inputs are decoded in batches.
Each input is cut to `--inputs_length` tokens (EOS included; default: the inputs length the
checkpoint was trained with, recorded with it, else 512), and stderr says how many were cut.
Every input is its own MoE routing group (`SwitchConfig.for_inference`), so its output does not
depend on the batch it lands in; the fraction of token-to-expert assignments that expert
capacity dropped is logged (a warning when not 0). Decoding settings come from flags, else from
gin (`infer.method = ...`, configs/runs/infer.gin), else from the signature of `infer`. Each
output is printed on its own line, in input order, one per input line: a blank input line gives
an empty output line (and is not decoded); `--output_file` also writes {"input", "prediction",
"score", "empty_input", "truncated"} JSON lines (score null for an empty input).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np

from switch_t5 import (
    checkpoints,
    decoding,
    evaluation,
    fileio,
    gin_utils,
    init_checkpoint,
    run_builder,
)
from switch_t5.errors import UserError

log = logging.getLogger(__name__)

# The inputs length when the checkpoint records none (e.g. imported from Hugging Face): T5's
# pretraining length, also `train`'s default.
DEFAULT_INPUTS_LENGTH = 512


@dataclasses.dataclass
class Prediction:
    """One output.

    Attributes:
      input: the input text.
      prediction: the decoded text (up to EOS); "" for an empty input.
      score: greedy/sample: the model's log-probability of the output; beam: the best beam's
        length-penalised score; None for an empty input (not decoded).
      empty_input: the input is empty or only white space.
      truncated: the input was longer than the inputs length and was cut.
    """

    input: str
    prediction: str
    score: float | None
    empty_input: bool = False
    truncated: bool = False


def resolve_vocabulary(
    ref: init_checkpoint.CheckpointRef, vocabulary_path: str | None = None
) -> Any:
    """The seqio vocabulary: `vocabulary_path`, the VOCABULARY_PATH macro, or the checkpoint's.

    Raises:
      FileNotFoundError: no vocabulary is given and the checkpoint's recorded one is missing.
    """
    from switch_t5 import data_gin
    from switch_t5.data import vocab as vocab_lib

    path = vocabulary_path or data_gin.macro("VOCABULARY_PATH", None)
    if path:
        path = data_gin.vocabulary_path(path)  # "embedded": the embedded corpus's vocabulary
    else:
        path = (ref.meta.get("vocabulary") or {}).get("path")
        if not path or not fileio.exists(path):
            raise FileNotFoundError(
                f"the checkpoint {ref.step_dir} records the vocabulary {path!r}, which is not on "
                "this machine; pass --vocabulary_path=SPM_MODEL (the SentencePiece model it was "
                "trained with)"
            )
    return vocab_lib.get_vocabulary(path)


def encode_inputs(
    texts: Sequence[str],
    vocabulary: Any,
    inputs_length: int | None = None,
    max_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(<int32>[len(texts), length] token ids ending in EOS, <bool>[len(texts)] truncated).

    Inputs longer than the length are cut to length - 1 tokens plus EOS (T5's
    `append_eos_after_trim`). `inputs_length` gives the length; None = the longest input
    rounded up to a multiple of 8 (fewer distinct shapes to compile), at most `max_length`.
    """
    ids = [list(vocabulary.encode(t)) for t in texts]
    if inputs_length is None:
        longest = max(len(i) for i in ids) + 1
        inputs_length = -(-longest // 8) * 8
        if max_length is not None:
            inputs_length = min(inputs_length, max_length)
    if inputs_length < 2:
        raise UserError(
            f"inputs_length={inputs_length} must be at least 2 (a token and EOS); "
            "set --inputs_length=N"
        )
    out = np.zeros((len(ids), inputs_length), np.int32)
    truncated = np.zeros((len(ids),), bool)
    for row, tokens in enumerate(ids):
        if len(tokens) > inputs_length - 1:
            truncated[row] = True
            tokens = tokens[: inputs_length - 1]
        tokens = [*tokens, decoding.EOS_ID]
        out[row, : len(tokens)] = tokens
    return out, truncated


def is_empty_input(text: str) -> bool:
    """Empty or white space only: nothing to decode."""
    return not text.strip()


def default_inputs_length(ref: init_checkpoint.CheckpointRef) -> tuple[int, str]:
    """(the inputs length to cut inputs to, where it comes from) for a checkpoint."""
    lengths = checkpoints.recorded_feature_lengths(ref.meta, ref.step_dir)
    if lengths and lengths.get("inputs"):
        return int(lengths["inputs"]), "the inputs length the checkpoint was trained with"
    return DEFAULT_INPUTS_LENGTH, "the default; the checkpoint records no training length"


@gin.configurable("infer", module="switch_t5")
def infer(
    checkpoint_dir: str = gin.REQUIRED,
    inputs: Sequence[str] = (),
    step: int | None = None,
    vocabulary_path: str | None = None,
    inputs_length: int | None = None,
    batch_size: int | None = None,
    method: decoding.DecodeMethod = "greedy",
    max_decode_length: int = 64,
    num_beams: int = 4,
    alpha: float = 0.6,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int = 0,
    mesh_data: int = -1,
    mesh_expert: int | None = None,
    mesh_model: int = 1,
) -> list[Prediction]:
    """Decodes `inputs` with a checkpoint; see the module docstring.

    Args:
      checkpoint_dir: MODEL_DIR, its checkpoints/ folder or one step's folder.
      inputs: input texts.
      step: the step to load (None = latest, or the one checkpoint_dir names).
      vocabulary_path: SentencePiece model; None = VOCABULARY_PATH macro, else the checkpoint's.
      inputs_length: encoder length: inputs are padded or cut to it; None = the longest input
        rounded up to a multiple of 8, at most the checkpoint's training inputs length
        (`DEFAULT_INPUTS_LENGTH` when it records none).
      batch_size: rows per decode batch; None = enough for the inputs (at most 32), rounded up
        to a multiple of the data x expert mesh size.
      method, max_decode_length, num_beams, alpha, temperature, top_k, top_p, seed: decoding
        (`decoding.DecodingConfig`).
      mesh_data, mesh_expert, mesh_model: the mesh (see `partitioning.make_mesh`).

    Returns:
      One Prediction per input, in order; an empty input gets an empty prediction (flagged,
      not decoded).
    """
    if checkpoint_dir is gin.REQUIRED or not checkpoint_dir:
        raise UserError("give the checkpoint: --checkpoint_dir=MODEL_DIR (or one step's folder)")
    texts = [str(t) for t in inputs]
    if not texts:
        raise UserError("no inputs: pass --input=TEXT (repeatable) or --input_file=FILE")
    # Checked before the checkpoint is loaded.
    settings = decoding.DecodingConfig(
        method, max_decode_length, num_beams, alpha, temperature, top_k, top_p, seed
    )
    ref, vocabulary = _checkpoint(checkpoint_dir, step, vocabulary_path)
    model, params, _, mesh = run_builder.load_model(
        ref, (mesh_data, mesh_expert, mesh_model), vocabulary, gin_utils.model_overrides()
    )
    rows = [i for i, text in enumerate(texts) if not is_empty_input(text)]
    predictions = [Prediction(text, "", None, empty_input=True) for text in texts]
    if not rows:
        return predictions
    shards = mesh.shape["data"] * mesh.shape["expert"]
    if batch_size is None:
        batch_size = -(-min(len(rows), 32) // shards) * shards
    tokens, truncated = _encode(ref, [texts[i] for i in rows], vocabulary, inputs_length)
    decoder = evaluation.BatchDecoder(model, mesh, batch_size, settings=settings)
    out, scores = decoder(params, tokens)
    report_drops(decoder.fraction_dropped)
    for i, row, score, cut in zip(rows, out, scores, truncated):
        text = vocabulary.decode(evaluation.output_ids(row))
        predictions[i] = Prediction(texts[i], text, float(score), truncated=bool(cut))
    return predictions


def _checkpoint(checkpoint_dir: str, step: int | None, vocabulary_path: str | None):
    """(checkpoint ref, vocabulary) of a run folder or one step's folder."""
    checkpoints.check_model_dir(
        checkpoint_dir,
        "--checkpoint_dir",
        "give a training run's MODEL_DIR, its checkpoints/ folder or one step's folder",
    )
    ref = init_checkpoint.find_checkpoint(checkpoint_dir, step)
    if ref is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {checkpoint_dir}; give a MODEL_DIR, its checkpoints/ "
            "folder or one step's folder (…/checkpoints/N)"
        )
    return ref, resolve_vocabulary(ref, vocabulary_path)


def _encode(ref, texts: Sequence[str], vocabulary, inputs_length: int | None):
    """Encoded inputs (see `encode_inputs`); says on stderr when some were cut."""
    limit, source = default_inputs_length(ref)
    tokens, truncated = encode_inputs(
        texts, vocabulary, inputs_length, None if inputs_length else limit
    )
    if truncated.any():
        # stderr, whatever the logging setup: the outputs of cut inputs may be worse.
        print(
            f"infer: cut {int(truncated.sum())} of {len(texts)} inputs to {tokens.shape[1]} "
            "tokens (EOS included; "
            + ("--inputs_length" if inputs_length else source)
            + "); set --inputs_length=N for another length",
            file=sys.stderr,
            flush=True,
        )
    return tokens, truncated


def report_drops(fraction_dropped: float) -> None:
    """Logs the MoE drops of an inference call (a warning when expert capacity dropped any)."""
    if fraction_dropped > 0:
        log.warning(
            "MoE routing dropped %.2f%% of the inputs' token-to-expert assignments (expert "
            "capacity; each input is routed on its own, so its outputs do not depend on the "
            "others); a dropped token skips its expert. Raise switch_t5.SwitchConfig."
            "eval_capacity_factor (or expert_capacity) or set switch_t5.SwitchConfig.dispatch = "
            "'dropless' to drop none",
            100 * fraction_dropped,
        )
    else:
        log.info("MoE routing dropped no token-to-expert assignment")


# The flags that override `infer`'s parameters: the decoding settings, then the rest.
_DECODE_FLAGS = {
    **decoding.FLAG_TYPES,
    "batch_size": int,
    "inputs_length": int,
    "step": int,
    "vocabulary_path": str,
}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run a checkpoint on new inputs and print its outputs."
    parser.add_argument("--checkpoint_dir", required=True, help="MODEL_DIR or one step's folder")
    parser.add_argument("--input", action="append", default=[], help="input text (repeatable)")
    parser.add_argument("--input_file", default=None, help="one input per line")
    parser.add_argument("--output_file", default=None, help="also write JSON lines here")
    for name, kind in _DECODE_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"overrides infer.{name}")


def read_input_file(path: str) -> list[str]:
    """Every line of a UTF-8 file, blank ones included (each input line gets one output line);
    newline characters removed."""
    if not fileio.exists(path):
        raise FileNotFoundError(f"--input_file {path} does not exist")
    # Lines end at "\n" only (as `wc -l` and the output file count them), not at the other
    # separators str.splitlines() knows (form feed, U+2028, ...).
    texts = fileio.read_text(path).split("\n")
    if texts[-1] == "":
        texts.pop()  # the newline that ends the last line
    texts = [t.removesuffix("\r") for t in texts]
    if not any(not is_empty_input(t) for t in texts):
        raise UserError(f"--input_file {path} has no non-blank line: write one input per line")
    return texts


def main(argv: Sequence[str]) -> list[Prediction]:
    flags = gin_utils.parse_flags(argv, _add_arguments)
    import switch_t5.data_gin  # noqa: F401  (registers its configurables before parsing)

    gin_utils.parse_gin(flags.gin_files, flags.gin_bindings)
    rest = flags.rest
    texts = list(rest.input)
    if rest.input_file:
        texts += read_input_file(rest.input_file)
    overrides = {k: getattr(rest, k) for k in _DECODE_FLAGS if getattr(rest, k) is not None}
    predictions = infer(checkpoint_dir=rest.checkpoint_dir, inputs=texts, **overrides)
    if jax.process_index() == 0:
        for p in predictions:
            print(p.prediction, flush=True)
        if rest.output_file:
            lines = "".join(
                json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n" for p in predictions
            )
            fileio.write_text(rest.output_file, lines)
    return predictions


def console_main() -> None:
    """The `python -m switch_t5.infer` command."""
    # infer's input checks raise ValueError with the fix in the message.
    gin_utils.run_console_main(main, (ValueError,))


if __name__ == "__main__":
    console_main()
