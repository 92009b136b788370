"""The inference entry point on a checkpoint: outputs equal direct decoding, batching, flags over
gin, JSON lines, one output per input line (blank ones flagged), inputs cut to the training
length, and clear errors."""

import dataclasses
import functools
import json

import gin
import jax
import numpy as np
import pytest
from flax import linen as nn
from tiny import tiny_config

from switch_t5 import (
    checkpoints,
    decoding,
    evaluation,
    infer,
    init_checkpoint,
    network,
    run_builder,
)
from switch_t5.data import vocab
from switch_t5.data import vocab as vocab_lib
from switch_t5.errors import UserError

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "window"]
# 8 rows of 16 tokens; inference routes each row (and each row's decoding step) as its own
# group, laid over the 8 batch shards of the default mesh on 8 devices.
LENGTH = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    # Enough pieces for every word to be one token.
    rng = np.random.default_rng(5)
    docs = [" ".join(rng.choice(WORDS, 5)) for _ in range(200)] + ["yes no maybe"] * 20
    spm = vocab.train_sentencepiece(docs, str(root / "spm.model"), 100 + 32)
    vocabulary = vocab.get_vocabulary(spm)
    config = tiny_config(
        vocab_size=256,  # pad_vocab_size(132)
        group_size=16,
        eval_capacity_factor=4.0,  # no drops: a row's output is independent of the others
    )
    params = jax.device_get(
        nn.unbox(network.init_variables(config, jax.random.PRNGKey(3))["params"])
    )
    model_dir = str(root / "model")
    saver = checkpoints.Checkpointer(model_dir, async_save=False)
    meta = checkpoints.make_meta(config, vocab_lib.vocabulary_record(vocabulary))
    saver.save(7, {"params": params, "step": np.int32(7)}, {}, meta)
    saver.close()
    # The same checkpoint as a training run records it: with its feature lengths (inputs are
    # cut to LENGTH by default).
    trained_dir = str(root / "trained")
    saver = checkpoints.Checkpointer(trained_dir, async_save=False)
    lengths = {"inputs": LENGTH, "targets": LENGTH}
    meta = checkpoints.make_meta(config, vocab_lib.vocabulary_record(vocabulary), lengths)
    saver.save(7, {"params": params, "step": np.int32(7)}, {}, meta)
    saver.close()
    return {
        "root": root,
        "dir": model_dir,
        "trained_dir": trained_dir,
        "vocabulary": vocabulary,
        "config": config,
        "params": params,
    }


def _infer_file(ckpt, input_file, out_file, *extra):
    """`python -m switch_t5.infer` in-process on an input file, from a clean gin config."""
    gin.clear_config()
    try:
        return infer.main(
            [
                f"--checkpoint_dir={ckpt['dir']}",
                *extra,
                f"--input_file={input_file}",
                f"--output_file={out_file}",
                f"--inputs_length={LENGTH}",
                f"--max_decode_length={LENGTH}",
            ]
        )
    finally:
        gin.clear_config()


def _direct(ckpt, texts, length=LENGTH, **kwargs):
    """Greedy outputs decoded one input at a time, without a mesh."""
    vocabulary = ckpt["vocabulary"]
    tokens, _ = infer.encode_inputs(texts, vocabulary, length)
    model = network.EncoderDecoder(ckpt["config"])
    decode = jax.jit(
        functools.partial(decoding.decode_batch, model, max_decode_length=LENGTH, **kwargs)
    )
    outs = []
    for row in tokens:
        out = decode(ckpt["params"], {"encoder_input_tokens": row[None]})
        outs.append(vocabulary.decode(evaluation.output_ids(np.asarray(out.tokens[0]))))
    return outs


def test_cli_inputs_and_file_match_direct_decoding(ckpt, tmp_path, capsys):
    texts = ["apple river stone", "green music", "table window cloud apple"]
    more = [
        "stone stone",
        "river apple",
        "music",
        "window green table",
        "cloud",
        "apple apple",
        "green",
    ]
    input_file = tmp_path / "inputs.txt"
    input_file.write_text("\n".join(more) + "\n\n")  # ends with a blank line: an empty output
    out_file = tmp_path / "out.jsonl"
    predictions = _infer_file(ckpt, input_file, out_file, *(f"--input={t}" for t in texts))
    everything = texts + more  # 10 inputs: two batches of 8, the second padded
    expected = [*_direct(ckpt, everything), ""]
    assert [p.input for p in predictions] == [*everything, ""]
    assert [p.prediction for p in predictions] == expected
    assert [p.empty_input for p in predictions] == [False] * 10 + [True]
    printed = capsys.readouterr().out.splitlines()
    assert printed[-len(expected) :] == expected
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prediction"] for r in records] == expected
    assert all(np.isfinite(r["score"]) and r["score"] <= 0.0 for r in records[:-1])
    assert records[-1] == {
        "input": "",
        "prediction": "",
        "score": None,
        "empty_input": True,
        "truncated": False,
    }


def test_blank_lines_keep_one_output_per_input_line(ckpt, tmp_path, capsys):
    """Blank input lines were dropped, so the outputs no longer lined up with the inputs."""
    lines = ["apple river", "", "green music", "   ", "cloud\r"]
    input_file = tmp_path / "inputs.txt"
    input_file.write_text("\n".join(lines) + "\n")
    assert infer.read_input_file(str(input_file)) == [
        "apple river",
        "",
        "green music",
        "   ",
        "cloud",
    ]
    out_file = tmp_path / "out.jsonl"
    predictions = _infer_file(ckpt, input_file, out_file)
    direct = _direct(ckpt, ["apple river", "green music", "cloud"])
    expected = [direct[0], "", direct[1], "", direct[2]]
    assert [p.prediction for p in predictions] == expected
    assert [p.empty_input for p in predictions] == [False, True, False, True, False]
    assert capsys.readouterr().out.split("\n")[-6:] == [*expected, ""]
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(records) == 5
    assert [r["input"] for r in records] == ["apple river", "", "green music", "   ", "cloud"]
    assert [r["score"] is None for r in records] == [False, True, False, True, False]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(UserError, match="no non-blank line"):
        infer.read_input_file(str(blank))


def test_long_inputs_are_cut_to_the_training_length(ckpt, capsys):
    """A 94 KB line once set the encoder length (26,024 tokens: an 18 GB allocation); inputs
    are now cut to the length the checkpoint was trained with, and stderr says so."""
    long = " ".join(WORDS[i % len(WORDS)] for i in range(16_000))
    assert len(long) > 90_000
    gin.clear_config()
    predictions = infer.infer(
        checkpoint_dir=ckpt["trained_dir"],
        inputs=[long, "green music"],
        max_decode_length=LENGTH,
    )
    err = capsys.readouterr().err
    assert (
        f"cut 1 of 2 inputs to {LENGTH} tokens (EOS included; the inputs length the checkpoint "
        "was trained with)" in err
    )
    assert [p.truncated for p in predictions] == [True, False]
    assert [p.prediction for p in predictions] == _direct(ckpt, [long, "green music"])
    # --inputs_length wins; a checkpoint recording no length cuts at DEFAULT_INPUTS_LENGTH.
    tokens, cut = infer.encode_inputs([long, "cloud"], ckpt["vocabulary"], 12)
    assert tokens.shape == (2, 12) and cut.tolist() == [True, False]
    assert tokens[0, -1] == decoding.EOS_ID
    ref = init_checkpoint.find_checkpoint(ckpt["dir"])
    limit, _ = infer.default_inputs_length(ref)
    assert limit == infer.DEFAULT_INPUTS_LENGTH == 512
    tokens, _ = infer.encode_inputs([long], ckpt["vocabulary"], None, limit)
    assert tokens.shape == (1, 512)


def test_flags_override_gin_and_step_dir(ckpt, tmp_path):
    gin_file = tmp_path / "beam.gin"
    gin_file.write_text("switch_t5.infer.method = 'beam'\nswitch_t5.infer.num_beams = 2\n")
    texts = ["apple river stone", "green music"]
    common = [
        f"--checkpoint_dir={ckpt['dir']}/checkpoints/7",
        *(f"--input={t}" for t in texts),
        f"--inputs_length={LENGTH}",
        f"--max_decode_length={LENGTH}",
    ]
    gin.clear_config()
    greedy = infer.main([f"--gin_file={gin_file}", *common, "--method=greedy"])
    gin.clear_config()
    beam = infer.main([f"--gin_file={gin_file}", *common])
    gin.clear_config()
    assert [p.prediction for p in greedy] == _direct(ckpt, texts)
    assert [p.prediction for p in beam] == _direct(ckpt, texts, method="beam", num_beams=2)


def test_errors_name_the_problem(ckpt, tmp_path):
    gin.clear_config()
    with pytest.raises(ValueError, match="no inputs"):
        infer.infer(checkpoint_dir=ckpt["dir"], inputs=[])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        infer.infer(checkpoint_dir=str(tmp_path), inputs=["x"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        infer.read_input_file(str(tmp_path / "missing.txt"))
    a_file = tmp_path / "model.txt"
    a_file.write_text("x")
    with pytest.raises(checkpoints.ModelDirIsFileError, match="is a file, not a folder"):
        infer.infer(checkpoint_dir=str(a_file), inputs=["x"])
    other = vocab.train_sentencepiece(
        [" ".join(reversed(WORDS)) + " zzz"] * 30,
        str(tmp_path / "other.model"),
        100 + 24,
    )
    with pytest.raises(init_checkpoint.InitialCheckpointError, match="VOCABULARY_PATH"):
        infer.infer(checkpoint_dir=ckpt["dir"], inputs=["x"], vocabulary_path=other)


@pytest.fixture(scope="module")
def dropping_ckpt(tmp_path_factory, ckpt):
    """The tiny model with sharpened routers and little eval capacity: MoE layers drop tokens."""
    config = tiny_config(
        vocab_size=256, eval_capacity_factor=0.6, min_expert_capacity=1, group_size=1024
    )
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 20.0 if "router" in jax.tree_util.keystr(path) else a,
        ckpt["params"],
    )
    model_dir = str(tmp_path_factory.mktemp("dropping") / "model")
    saver = checkpoints.Checkpointer(model_dir, async_save=False)
    meta = checkpoints.make_meta(config, vocab_lib.vocabulary_record(ckpt["vocabulary"]))
    saver.save(3, {"params": params, "step": np.int32(3)}, {}, meta)
    saver.close()
    return model_dir


def test_outputs_do_not_depend_on_batch_mates(dropping_ckpt, ckpt, caplog):
    """Each input is its own routing group: batch 1, batch 6, shuffled and differently padded
    inputs give the same tokens and scores, although expert capacity drops tokens."""
    texts = [
        "apple river stone green music table window cloud",
        "green",
        "music table window",
        "stone stone apple river cloud cloud green music table",
        "cloud apple",
        "window green table river",
    ]
    gin.clear_config()
    with caplog.at_level("WARNING"):
        predictions = infer.infer(
            checkpoint_dir=dropping_ckpt, inputs=texts, inputs_length=LENGTH, max_decode_length=8
        )
    assert "MoE routing dropped" in caplog.text  # capacity really drops tokens here
    ref = init_checkpoint.find_checkpoint(dropping_ckpt)
    model, params, config, mesh = run_builder.load_model(ref)
    assert config.routing_groups == "sequence"
    decoder = evaluation.BatchDecoder(model, mesh, 8, 8)
    tokens, _ = infer.encode_inputs(texts, ckpt["vocabulary"], LENGTH)
    together = decoder(params, tokens)
    assert decoder.fraction_dropped > 0.2
    assert [p.score for p in predictions] == [float(s) for s in together[1]]
    alone = [decoder(params, tokens[i : i + 1]) for i in range(len(texts))]
    perm = np.array([3, 5, 0, 2, 4, 1])
    shuffled = decoder(params, tokens[perm])
    longer, _ = infer.encode_inputs(texts, ckpt["vocabulary"], 40)
    padded = decoder(params, longer)
    # The (2, 2, 2) mesh, batches of 4 (the second padded with empty rows).
    model_222, params_222, _, mesh_222 = run_builder.load_model(ref, (2, 2, 2))
    on_mesh = evaluation.BatchDecoder(model_222, mesh_222, 4, 8)(params_222, tokens)
    for i, (row, score) in enumerate(alone):
        j = int(np.flatnonzero(perm == i)[0])
        for got in (
            (together[0][i], together[1][i]),
            (shuffled[0][j], shuffled[1][j]),
            (padded[0][i], padded[1][i]),
            (on_mesh[0][i], on_mesh[1][i]),
        ):
            np.testing.assert_array_equal(got[0], row[0])
            np.testing.assert_allclose(got[1], score[0], rtol=1e-5, atol=1e-6)
    # The random model emits one token over and over; its scores tell the inputs apart.
    assert len({round(float(score[0]), 4) for _, score in alone}) == len(texts)
    # Routing groups over the tokens of several inputs (training's setting) mix them up.
    tokens_model = network.EncoderDecoder(dataclasses.replace(config, routing_groups="tokens"))
    mixed = evaluation.BatchDecoder(tokens_model, mesh, 8, 8)
    batch_scores = mixed(params, tokens)[1]
    assert any(mixed(params, tokens[i : i + 1])[1][0] != batch_scores[i] for i in range(6))
