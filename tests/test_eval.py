"""Decode-and-score evaluation: every example once, postprocessing and metrics, outputs written,
mixture averages, the best-checkpoint keeper and setting errors."""

import json

import jax
import numpy as np
import pytest
from flax import linen as nn
from tiny import tiny_config

seqio = pytest.importorskip("seqio")

from switch_t5 import (  # noqa: E402
    checkpoints,
    decoding,
    evaluation,
    network,
    partitioning,
)
from switch_t5 import eval as eval_lib  # noqa: E402
from switch_t5.data import glue, user_tasks, vocab  # noqa: E402
from switch_t5.data import metrics as metrics_lib  # noqa: E402

LENGTHS = {"inputs": 16, "targets": 8}
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "window"]


def _config(vocab_size):
    # Odd sizes; eval capacity factor 4 with 4 experts: no token is ever dropped, so a row's
    # output cannot depend on the other rows of its batch.
    return tiny_config(
        vocab_size=vocab_size, moe_layer_interval=2, group_size=16, eval_capacity_factor=4.0
    )


def _rows(seed, n):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = list(rng.choice(WORDS, size=5))
        rows.append((" ".join(words), "yes" if "apple" in words else "no"))
    return rows


def _write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory, mesh_222):
    root = tmp_path_factory.mktemp("eval")
    # Enough pieces for every word to be one token (5-word inputs: 6 tokens with EOS).
    rng = np.random.default_rng(5)
    docs = [" ".join(rng.choice(WORDS, 5)) for _ in range(200)] + ["yes no maybe"] * 20
    spm = vocab.train_sentencepiece(docs, str(root / "spm.model"), 100 + 32)
    vocabulary = vocab.get_vocabulary(spm)
    # 11 rows with batch 8: the last batch holds 3 examples and 5 padding rows.
    rows_a, rows_b = _rows(0, 11), _rows(1, 5)
    for name, rows in (("eval_test_a", rows_a), ("eval_test_b", rows_b)):
        user_tasks.register_files_text_to_text(
            name,
            validation_files=_write_tsv(root / f"{name}.tsv", rows),
            vocabulary=vocabulary,
            input_template="{sentence}",  # 5 words: 6 tokens with EOS
            target_column="label",
            label_names=["no", "yes"],
            metrics=["accuracy"],
        )
    if "eval_test_mix" in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove("eval_test_mix")
    seqio.MixtureRegistry.add("eval_test_mix", [("eval_test_a", 1.0), ("eval_test_b", 1.0)])
    config = _config(256)  # pad_vocab_size(132)
    model = network.EncoderDecoder(config)
    boxed = network.init_variables(config, jax.random.PRNGKey(0))["params"]
    shardings = partitioning.params_shardings(boxed, mesh_222)
    params = jax.device_put(nn.unbox(boxed), shardings)
    return {
        "root": root,
        "vocabulary": vocabulary,
        "rows_a": rows_a,
        "rows_b": rows_b,
        "model": model,
        "params": params,
    }


@pytest.fixture(scope="module")
def evaluator_a(env, mesh_222):
    return evaluation.Evaluator(env["model"], "eval_test_a", LENGTHS, 8, mesh_222)


def test_every_example_once_and_padding_rows_do_not_change_outputs(env, evaluator_a):
    examples = evaluator_a.examples["eval_test_a"]
    assert [evaluation._text(ex["inputs_pretokenized"]) for ex in examples] == [
        s for s, _ in env["rows_a"]
    ]
    inputs = evaluator_a._encoder_inputs(examples)
    tokens, scores = evaluator_a.decoder(env["params"], inputs)
    assert tokens.shape == (11, LENGTHS["targets"]) and scores.shape == (11,)
    # Each example decoded alone (with 7 padding rows) gives the same output as in its batch.
    for i in (0, 8, 10):
        alone, alone_scores = evaluator_a.decoder(env["params"], inputs[i : i + 1])
        np.testing.assert_array_equal(alone[0], tokens[i])
        np.testing.assert_allclose(alone_scores[0], scores[i], rtol=1e-5, atol=1e-6)


class _FakeDecoder:
    """Returns chosen output texts for known inputs (to test scoring exactly)."""

    def __init__(self, vocabulary, outputs_by_input):
        self.vocabulary = vocabulary
        self.outputs = outputs_by_input
        self.rows_seen = 0

    def __call__(self, params, inputs):
        out = np.zeros((len(inputs), LENGTHS["targets"]), np.int32)
        for r, row in enumerate(inputs):
            text = self.vocabulary.decode(evaluation.output_ids(row))
            ids = [*self.vocabulary.encode(self.outputs[text]), decoding.EOS_ID, 5, 6]
            out[r, : len(ids)] = ids[: LENGTHS["targets"]]  # tokens after EOS are ignored
        self.rows_seen += len(inputs)
        return out, np.zeros(len(inputs), np.float32)


def _fake_outputs(rows, wrong):
    """Right labels except for the rows in `wrong` (flipped) and a non-label text for row 1."""
    out = {}
    for i, (s, label) in enumerate(rows):
        text = {"yes": "no", "no": "yes"}[label] if i in wrong else label
        out[s] = "maybe" if i == 1 else text
    return out


def test_scores_outputs_and_files(env, evaluator_a, tmp_path, monkeypatch):
    rows = env["rows_a"]
    fake = _FakeDecoder(env["vocabulary"], _fake_outputs(rows, wrong={3, 7}))
    monkeypatch.setattr(evaluator_a, "decoder", fake)
    result = evaluator_a.evaluate(None, step=12, output_dir=str(tmp_path))
    # Rows 1 ("maybe" -> class -1), 3 and 7 are wrong: 8 of 11 right.
    assert result.metrics == {"eval_test_a/accuracy": pytest.approx(100.0 * 8 / 11, abs=1e-9)}
    assert result.main_metric == "eval_test_a/accuracy"
    assert result.num_examples == {"eval_test_a": 11} and fake.rows_seen == 11
    lines = (tmp_path / evaluation.PREDICTIONS_FILE).read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert [p["input"] for p in predictions] == [s for s, _ in rows]
    assert [p["target"] for p in predictions] == [label for _, label in rows]
    assert predictions[1]["prediction"] == "maybe"
    assert set(predictions[0]) == {"task", "input", "target", "prediction"}
    record = json.loads((tmp_path / evaluation.METRICS_FILE).read_text())
    assert record["step"] == 12 and record["metrics"] == result.metrics
    evaluation.write_tensorboard(result, str(tmp_path / "tb"), 12)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_mixture_scores_each_task_and_averages(env, mesh_222, monkeypatch):
    evaluator = evaluation.Evaluator(env["model"], "eval_test_mix", LENGTHS, 8, mesh_222)
    assert [t.name for t in evaluator.tasks] == ["eval_test_a", "eval_test_b"]
    outputs = {
        **_fake_outputs(env["rows_a"], wrong={3, 7}),
        **_fake_outputs(env["rows_b"], wrong=set()),
    }
    monkeypatch.setattr(evaluator, "decoder", _FakeDecoder(env["vocabulary"], outputs))
    result = evaluator.evaluate(None)
    a, b = 100.0 * 8 / 11, 100.0 * 4 / 5
    assert result.metrics["eval_test_a/accuracy"] == pytest.approx(a, abs=1e-9)
    assert result.metrics["eval_test_b/accuracy"] == pytest.approx(b, abs=1e-9)
    assert result.main_metric == evaluation.MIXTURE_AVERAGE
    assert result.main_value == pytest.approx((a + b) / 2, abs=1e-9)
    assert result.num_examples == {"eval_test_a": 11, "eval_test_b": 5}


def test_glue_and_superglue_mixtures_score_the_benchmark_tasks(env):
    glue.register_glue_tasks(env["vocabulary"])
    for mixture, groups in (
        (glue.GLUE_MIXTURE, metrics_lib.GLUE_SCORE_GROUPS),
        (glue.SUPER_GLUE_MIXTURE, metrics_lib.SUPER_GLUE_SCORE_GROUPS),
    ):
        names = {t.name for t in evaluation.eval_tasks(mixture, "validation")}
        assert names == {task for members in groups.values() for task, _ in members}
    results = {}
    for i, members in enumerate(metrics_lib.GLUE_SCORE_GROUPS.values()):
        for j, (task, metric) in enumerate(members):
            results.setdefault(task, {})[metric] = 10.0 * i + j
    averages = evaluation._averages(glue.GLUE_MIXTURE, results, is_mixture=True)
    assert averages == {evaluation.GLUE_AVERAGE: metrics_lib.glue_average(results)}


def test_setting_errors(env, mesh_222):
    with pytest.raises(evaluation.EvalConfigError, match="multiple of the 4 batch shards"):
        evaluation.Evaluator(env["model"], "eval_test_a", LENGTHS, 6, mesh_222)
    with pytest.raises(evaluation.EvalConfigError, match="no 'train' split"):
        evaluation.eval_tasks("eval_test_a", "train")
    with pytest.raises(evaluation.EvalConfigError, match="CHECKPOINT_STEP"):
        evaluation.resolve_checkpoint(str(env["root"]), "latest")
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        evaluation.resolve_checkpoint(str(env["root"]), "best")


def test_best_checkpoint_keeper(tmp_path):
    def result(value):
        return evaluation.EvalResult({"t/accuracy": value}, {}, "t/accuracy", {}, [])

    state = {"w": np.arange(3, dtype=np.float32)}
    keeper = evaluation.BestCheckpointKeeper(str(tmp_path))
    assert keeper.update(10, result(50.0), state, {}, {"model_config": {}})
    assert not keeper.update(20, result(40.0), state, {}, {})
    assert not keeper.update(25, result(float("nan")), state, {}, {})
    assert keeper.update(30, result(60.0), {"w": state["w"] + 1}, {}, {"model_config": {}})
    keeper.close()
    record = json.loads((tmp_path / "best" / evaluation.BEST_RECORD).read_text())
    assert record["step"] == 30 and record["value"] == 60.0 and record["metric"] == "t/accuracy"
    ref = evaluation.resolve_checkpoint(str(tmp_path), "best")
    assert ref.step == 30
    assert checkpoints.Checkpointer(str(tmp_path / "best")).all_steps() == [30]
    # A resumed run continues from the record: 55 does not beat 60.
    again = evaluation.BestCheckpointKeeper(str(tmp_path))
    assert not again.update(40, result(55.0), state, {}, {})
    with pytest.raises(evaluation.EvalConfigError, match="keep_best_by='t/f1'"):
        evaluation.BestCheckpointKeeper(str(tmp_path), "t/f1").update(
            50, result(70.0), state, {}, {}
        )


# ---------------------------------------------------------------------------------------------
# A run knows what it is: `python -m switch_t5.eval --gin.MODEL_DIR=DIR` alone.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny run on the embedded span-corruption task (no gin: its macros are unset)."""
    import gin
    from tiny import TINY_FIELDS

    from switch_t5 import train as train_lib
    from switch_t5.config import SwitchConfig

    gin.clear_config()
    d = str(tmp_path_factory.mktemp("tiny_run"))
    train_lib.train(
        model_dir=d,
        train_steps=2,
        model_config=SwitchConfig(
            # Groups of 8 tokens: a batch of 8 rows splits over every shard count up to 8 (the
            # evaluation below runs on the default mesh, all 8 devices on the data axis).
            **{**TINY_FIELDS, "vocab_size": 4096, "moe_layer_interval": 2, "group_size": 8}
        ),
        mesh_data=2,
        mesh_expert=2,
        mesh_model=2,
        mixture_or_task_name="embedded_span_corruption",
        task_feature_lengths={"inputs": 32, "targets": 8},
        batch_size=8,
        eval_period=0,
        checkpoint_period=2,
        num_samples=0,
        progress="none",
        make_plots=False,
    )
    return d


def _eval_main(argv):
    import gin

    gin.clear_config()
    try:
        return eval_lib.main(argv)
    finally:
        gin.clear_config()


def test_eval_from_model_dir_alone_reports_teacher_forced_loss(tiny_run, capsys):
    from switch_t5 import init_checkpoint, trainer

    ref = init_checkpoint.find_checkpoint(tiny_run)
    assert checkpoints.recorded_task(ref.meta) == {"name": "embedded_span_corruption", "data": {}}
    # No gin file, no task: the recorded task and lengths; a span task has no metric functions,
    # so its validation split is scored teacher-forced (it used to be refused).
    result = _eval_main(
        [
            f"--gin.MODEL_DIR='{tiny_run}'",
            "--gin.BATCH_SIZE=8",
            "--gin.switch_t5.evaluate.max_examples=16",
        ]
    )
    out = capsys.readouterr().out
    task = "embedded_span_corruption"
    assert result.main_metric == f"{task}/{trainer.CROSS_ENTROPY}"
    assert f"  {task}/{trainer.CROSS_ENTROPY}: " in out
    assert f"  {task}/accuracy: " in out
    assert 0.0 < result.metrics[result.main_metric] < 2 * np.log(4096)
    assert 0.0 <= result.metrics[f"{task}/accuracy"] <= 1.0
    assert result.num_examples[task] == 16  # two batches of 8
    with open(f"{tiny_run}/eval/{evaluation.METRICS_FILE}") as f:
        assert json.load(f)["metrics"] == pytest.approx(result.metrics)
    with open(f"{tiny_run}/eval/config.gin") as f:
        assert "TASK_FEATURE_LENGTHS = None" in f.read()


def test_task_flag_replaces_the_recorded_task(tiny_run, tmp_path, env):
    tsv = _write_tsv(tmp_path / "other.tsv", _rows(3, 5))
    result = _eval_main(
        [
            f"--gin.MODEL_DIR='{tiny_run}'",
            "--gin.MIXTURE_OR_TASK_NAME='files_text_to_text'",
            f"--gin.VALIDATION_FILES='{tsv}'",
            "--gin.VOCABULARY_PATH='embedded'",
            "--gin.INPUT_TEMPLATE='{sentence}'",
            "--gin.TARGET_COLUMN='label'",
            "--gin.METRICS=['accuracy']",
            "--gin.BATCH_SIZE=8",
        ]
    )
    # Decoded and scored on the given file (5 rows), not the recorded span task.
    assert result.num_examples == {"files_text_to_text": 5}
    assert result.main_metric == "files_text_to_text/accuracy"


def test_recorded_data_macros_fill_only_unset_ones(tmp_path):
    import gin

    from switch_t5 import data_gin

    meta = checkpoints.make_meta(
        tiny_config(),
        {},
        LENGTHS,
        {
            "name": "files_text_to_text",
            "data": {"VALIDATION_FILES": "a.tsv", "VOCABULARY_PATH": "v.model"},
        },
    )
    recorded = checkpoints.recorded_task(json.loads(json.dumps(meta)))
    gin.clear_config()
    try:
        gin.parse_config("VALIDATION_FILES = 'b.tsv'")
        assert eval_lib.apply_recorded_task(recorded, None) == "files_text_to_text"
        assert data_gin.macro("VALIDATION_FILES") == "b.tsv"  # the flag replaces the record
        assert data_gin.macro("VOCABULARY_PATH") == "v.model"
        gin.clear_config()
        # Another task keeps only the recorded vocabulary.
        assert eval_lib.apply_recorded_task(recorded, "glue_rte_v002") == "glue_rte_v002"
        assert data_gin.macro("VALIDATION_FILES", None) is None
        assert data_gin.macro("VOCABULARY_PATH") == "v.model"
        gin.clear_config()
        # A converted checkpoint records no task: the task must be given.
        assert checkpoints.recorded_task(checkpoints.make_meta(tiny_config())) is None
        with pytest.raises(evaluation.EvalConfigError, match="records no task"):
            eval_lib.apply_recorded_task(None, None)
    finally:
        gin.clear_config()
