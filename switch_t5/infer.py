"""Inference entry point: run a checkpoint on new inputs and print its outputs.

    python -m switch_t5.infer --checkpoint_dir=/tmp/rte_finetune \\
      --input="rte sentence1: Ann is tall. sentence2: Ann is short."
    python -m switch_t5.infer --checkpoint_dir=/tmp/rte_finetune/checkpoints/2000 \\
      --input_file=inputs.txt --output_file=outputs.jsonl --method=beam --num_beams=4

`--checkpoint_dir` is a MODEL_DIR (its latest step, or `--step`), its checkpoints/ folder or one
step's folder. The model config comes from the checkpoint (`switch_t5.SwitchConfig.*` gin
bindings override fields such as `eval_capacity_factor`); the vocabulary is the one the
checkpoint records, or `--vocabulary_path` / the VOCABULARY_PATH macro (checked against the
checkpoint's hash). `--input_file` holds one input per line (blank lines are skipped); inputs
are decoded in batches. Every input is its own MoE routing group (`SwitchConfig.for_inference`),
so its output does not depend on the batch it lands in; the fraction of token-to-expert
assignments that expert capacity dropped is logged (a warning when not 0). Decoding settings
come from flags, else from gin (`infer.method = ...`, configs/runs/infer.gin), else from the
signature of `infer`. Each output is printed on its own
line, in input order; `--output_file` also writes {"input", "prediction", "score"} JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np

from switch_t5 import checkpoints, decoding, gin_utils, init_checkpoint
from switch_t5 import eval as eval_lib

log = logging.getLogger(__name__)

EMBEDDED_VOCABULARY = "embedded"


@dataclasses.dataclass
class Prediction:
    """One output.

    Attributes:
      input: the input text.
      prediction: the decoded text (up to EOS).
      score: greedy/sample: the model's log-probability of the output; beam: the best beam's
        length-penalised score.
    """

    input: str
    prediction: str
    score: float


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
    if path == EMBEDDED_VOCABULARY:
        from switch_t5.data import corpus

        info = corpus.prepare_embedded_corpus(None)
        path = corpus.embedded_vocabulary_path(info, corpus_vocab_size())
    if not path:
        path = (ref.meta.get("vocabulary") or {}).get("path")
        if not path or not checkpoints.exists(path):
            raise FileNotFoundError(
                f"the checkpoint {ref.step_dir} records the vocabulary {path!r}, which is not on "
                "this machine; pass --vocabulary_path=SPM_MODEL (the SentencePiece model it was "
                "trained with)"
            )
    return vocab_lib.get_vocabulary(path)


def corpus_vocab_size() -> int:
    """The embedded corpus vocabulary size registered in gin (default 4096)."""
    try:
        return int(gin.query_parameter("switch_t5.data_gin.register_tasks.embedded_vocab_size"))
    except ValueError:
        return 4096


def encode_inputs(
    texts: Sequence[str], vocabulary: Any, inputs_length: int | None
) -> tuple[np.ndarray, int]:
    """(<int32>[len(texts), inputs_length] token ids ending in EOS, number truncated).

    Inputs longer than inputs_length are cut to inputs_length - 1 tokens plus EOS (T5's
    `append_eos_after_trim`). inputs_length None = the longest input, rounded up to a multiple
    of 8 (fewer distinct shapes to compile).
    """
    ids = [list(vocabulary.encode(t)) for t in texts]
    if inputs_length is None:
        longest = max(len(i) for i in ids) + 1
        inputs_length = -(-longest // 8) * 8
    if inputs_length < 2:
        raise ValueError(f"inputs_length={inputs_length} must be at least 2 (a token and EOS)")
    out = np.zeros((len(ids), inputs_length), np.int32)
    truncated = 0
    for row, tokens in enumerate(ids):
        if len(tokens) > inputs_length - 1:
            truncated += 1
            tokens = tokens[: inputs_length - 1]
        tokens = [*tokens, decoding.EOS_ID]
        out[row, : len(tokens)] = tokens
    return out, truncated


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
      inputs_length: encoder length; None = the longest input rounded up to a multiple of 8.
      batch_size: rows per decode batch; None = enough for the inputs (at most 32), rounded up
        to a multiple of the data x expert mesh size.
      method, max_decode_length, num_beams, alpha, temperature, top_k, top_p, seed: decoding
        (see `decoding.decode_batch`).
      mesh_data, mesh_expert, mesh_model: the mesh (see `partitioning.make_mesh`).

    Returns:
      One Prediction per input, in order.
    """
    if checkpoint_dir is gin.REQUIRED or not checkpoint_dir:
        raise ValueError("give the checkpoint: --checkpoint_dir=MODEL_DIR (or one step's folder)")
    texts = [str(t) for t in inputs]
    if not texts:
        raise ValueError("no inputs: pass --input=TEXT (repeatable) or --input_file=FILE")
    ref = init_checkpoint.find_checkpoint(checkpoint_dir, step)
    if ref is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {checkpoint_dir}; give a MODEL_DIR, its checkpoints/ "
            "folder or one step's folder (…/checkpoints/N)"
        )
    vocabulary = resolve_vocabulary(ref, vocabulary_path)
    model, params, _, mesh = eval_lib.load_model(
        ref, (mesh_data, mesh_expert, mesh_model), vocabulary
    )
    shards = mesh.shape["data"] * mesh.shape["expert"]
    if batch_size is None:
        batch_size = -(-min(len(texts), 32) // shards) * shards
    tokens, truncated = encode_inputs(texts, vocabulary, inputs_length)
    if truncated:
        log.warning("%d input(s) longer than inputs_length were truncated", truncated)
    decoder = eval_lib.BatchDecoder(
        model,
        mesh,
        batch_size,
        max_decode_length,
        method=method,
        num_beams=num_beams,
        alpha=alpha,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    out, scores = decoder(params, tokens)
    report_drops(decoder.fraction_dropped)
    return [
        Prediction(text, vocabulary.decode(eval_lib.output_ids(row)), float(score))
        for text, row, score in zip(texts, out, scores)
    ]


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


_DECODE_FLAGS = {
    "method": str,
    "max_decode_length": int,
    "num_beams": int,
    "alpha": float,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
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
    """The non-blank lines of a UTF-8 file (trailing newline characters removed)."""
    if not checkpoints.exists(path):
        raise FileNotFoundError(f"--input_file {path} does not exist")
    lines = [line.rstrip("\r\n") for line in checkpoints.read_text(path).splitlines()]
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"--input_file {path} has no non-blank line")
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
            checkpoints.write_text(rest.output_file, lines)
    return predictions


def console_main() -> None:
    """The `python -m switch_t5.infer` command."""
    gin_utils.run_console_main(main, (*eval_lib.entry_point_errors(), ValueError))


if __name__ == "__main__":
    console_main()
