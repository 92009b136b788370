"""The task registry: shipped task names and macros, the gin edge, and a user's task loaded by a
gin `import` line (tests/toy_task.py) and built into batches."""

import json
import subprocess
import sys

import gin
import numpy as np
import pytest

from switch_t5 import data_gin, gin_utils
from switch_t5.data import corpus, features, registry
from switch_t5.data import vocab as vocab_lib

WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "cat", "dog", "sun"]
# Every macro the data pipeline read by name before the registry (data_gin.MACROS then).
SHIPPED_MACROS = {
    "MIXTURE_OR_TASK_NAME",
    "VOCABULARY_PATH",
    "TEXT_FILES",
    "TFDS_DATA_DIR",
    "TRAIN_FILES",
    "VALIDATION_FILES",
    "INPUT_TEMPLATE",
    "TARGET_COLUMN",
    "LABEL_NAMES",
    "METRICS",
    "HAS_HEADER",
    "COLUMN_NAMES",
}
# Read since the multilingual mixtures (switch_t5.data.multilingual_tasks).
MULTILINGUAL_MACROS = {
    "MC4_ALPHA",
    "MC4_LANGUAGES",
    "MC4_FILES",
    "MC4_VALIDATION_FILES",
    "MC4_COUNTS",
}


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def recorded():
    """A builder `rec_*` that records its calls, with one required and one optional macro."""
    calls = []

    def build(name, macros, settings):
        calls.append((name, dict(macros), settings))

    entry = registry.register_task_builder(
        "rec_*", build, macros=("REC_FILES", registry.Macro("REC_SIZE", 5))
    )
    yield calls
    registry.unregister_task_builder(entry)


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """Lines of 3-5 words, and a 132-id vocabulary trained on them."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, rng.integers(3, 6))) for _ in range(40)]
    (root / "lines.txt").write_text("\n".join(lines) + "\n")
    docs = [f"reverse: rev: {line}" for line in lines] * 5
    spm = vocab_lib.train_sentencepiece(docs, str(root / "spm.model"), vocab_size=100 + 32)
    return {"root": root, "lines": lines, "spm": spm}


def test_every_shipped_task_name_has_its_builder_and_macros():
    names = {
        "embedded_span_corruption": "build_embedded",
        "text_files_span_corruption": "build_text_files",
        "c4_span_corruption": "build_c4",
        "c4_v220_span_corruption": "build_c4",
        "files_text_to_text": "build_files_text_to_text",
        "glue_rte_v002": "build_glue",
        "glue_v002_proportional": "build_glue",
        "super_glue_boolq_v102": "build_glue",
        "dpr_v001_simple": "build_glue",
        "text_files_span_corruption.de": "build_text_files",
        "mc4_span_corruption": "build_mc4",
        "mc4_span_corruption.ru_Latn": "build_mc4",
    }
    for name, builder in names.items():
        assert registry.find_builder(name).build.__name__ == builder, name
    assert registry.find_builder("no_such_task") is None
    shipped = SHIPPED_MACROS | MULTILINGUAL_MACROS
    assert set(data_gin.MACROS) == shipped and data_gin.MACROS[0] == "MIXTURE_OR_TASK_NAME"
    assert len(data_gin.MACROS) == len(shipped)


def test_macros_follow_the_registry_and_names_are_checked(recorded):
    assert {"REC_FILES", "REC_SIZE"} <= set(data_gin.MACROS)
    assert registry.find_builder("rec_one").names == ("rec_*",)
    exact = registry.register_task_builder("rec_one", lambda *a: None, macros=("REC_ONE",))
    try:
        assert registry.find_builder("rec_one") is exact  # an exact name beats a prefix
        assert registry.find_builder("rec_two").names == ("rec_*",)
    finally:
        registry.unregister_task_builder(exact)
    assert "REC_ONE" not in data_gin.MACROS
    with pytest.raises(registry.TaskRegistryError, match="'text_files_span_corruption' already"):
        registry.register_task_builder("text_files_span_corruption", lambda *a: None)
    with pytest.raises(registry.TaskRegistryError, match="give a macro name"):
        registry.register_task_builder("bad_macro", lambda *a: None, macros=("NOT A NAME",))
    with pytest.raises(registry.TaskRegistryError, match="give task names"):
        registry.register_task_builder("*", lambda *a: None)
    with pytest.raises(registry.TaskRegistryError, match="give a function builder"):
        registry.register_task_builder("not_callable", "my_tasks.build")


def test_the_gin_edge_passes_macro_values_and_settings(recorded, clean_gin):
    gin_utils.parse_gin(
        [],
        [
            "MIXTURE_OR_TASK_NAME = 'rec_a'",
            "REC_FILES = ['x.txt']",  # read by name only: not an unused macro
            "CACHE = '/tmp/rec_cache'",
            "switch_t5.data_gin.register_tasks.cache_dir = %CACHE",
            "switch_t5.data_gin.register_tasks.embedded_vocab_size = 1024",
        ],
        finalize=False,
    )
    data_gin.register_tasks()
    (name, macros, settings), *_ = recorded
    assert (name, macros) == ("rec_a", {"REC_FILES": ["x.txt"], "REC_SIZE": 5})
    expected = registry.DataSettings(cache_dir="/tmp/rec_cache", embedded_vocab_size=1024)
    assert settings == expected == data_gin.data_settings()
    assert data_gin.set_macros() == {"REC_FILES": ["x.txt"]}
    gin.clear_config()
    with pytest.raises(data_gin.MissingMacroError, match="REC_FILES is not set but rec_b needs"):
        data_gin.register_tasks("rec_b")
    with pytest.raises(ValueError, match=r"'nope' is not a known task: use one of .*rec_\*"):
        data_gin.register_tasks("nope")


def _toy_gin(tmp_path, toy_files, *extra):
    path = tmp_path / "toy.gin"
    lines = [
        "import toy_task",
        "MIXTURE_OR_TASK_NAME = 'toy_reverse'",
        f"TOY_FILES = {json.dumps(str(toy_files['root'] / '*.txt'))}",
        f"VOCABULARY_PATH = {json.dumps(toy_files['spm'])}",
        *extra,
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_gin_import_line_registers_a_user_task_that_builds_batches(
    toy_files, tmp_path, clean_gin
):
    from switch_t5.data import pipeline, show

    sys.modules.pop("toy_task", None)
    gin_utils.parse_gin([_toy_gin(tmp_path, toy_files, "TOY_PREFIX = 'rev:'")])
    import toy_task

    name, cleanup = toy_task.register()
    try:
        assert gin.operative_config_str().startswith("import toy_task")  # config.gin has it
        data_gin.register_tasks()
        vocabulary = data_gin.get_vocabulary(name)
        assert vocabulary.sentencepiece_model_file == toy_files["spm"]
        rows = show.show(name, "validation", 2, {"inputs": 16, "targets": 16})
        for row, line in zip(rows, toy_files["lines"]):
            assert row["inputs_text"] == f"rev: {line}"
            assert row["targets_text"] == " ".join(reversed(line.split()))
        lengths = data_gin.check_lengths(name, {"inputs": 16, "targets": 8})
        batches = pipeline.InputPipeline(name, "train", lengths, 4, host_index=0, num_hosts=1)
        batch = next(batches)
        assert set(batch) == set(features.FEATURE_KEYS)
        assert batch["encoder_input_tokens"].shape == (4, 16)
        assert batch["decoder_target_tokens"].shape == (4, 8)
        assert (batch["decoder_loss_weights"].sum(1) > 0).all()
    finally:
        cleanup()
    assert registry.find_builder(name) is None and "TOY_FILES" not in data_gin.MACROS


def test_a_seqio_task_a_user_module_registers_itself_is_used_as_is(toy_files, clean_gin):
    import seqio
    import toy_task

    _, cleanup = toy_task.register()
    cleanup()  # only its `build` function is used here
    macros = {"TOY_FILES": str(toy_files["root"] / "*.txt"), "VOCABULARY_PATH": toy_files["spm"]}
    toy_task.build("toy_direct", {**macros, "TOY_PREFIX": "r:"}, registry.DataSettings())
    try:
        assert registry.find_builder("toy_direct") is None
        data_gin.register_tasks("toy_direct")
        assert data_gin.get_vocabulary("toy_direct").sentencepiece_model_file == toy_files["spm"]
    finally:
        seqio.TaskRegistry.remove("toy_direct")


def test_a_user_task_macro_misspelt_is_refused_and_a_missing_module_named(
    toy_files, tmp_path, clean_gin
):
    sys.modules.pop("toy_task", None)
    with pytest.raises(gin_utils.GinConfigError, match=r"TOY_FILE is set .*did you mean TOY_FILES"):
        gin_utils.parse_gin([_toy_gin(tmp_path, toy_files, "TOY_FILE = 'x'")])
    import toy_task

    _, cleanup = toy_task.register()
    cleanup()
    bad = tmp_path / "bad.gin"
    bad.write_text("import no_such_tasks_module\n")
    with pytest.raises(gin_utils.GinConfigError, match="No module named 'no_such_tasks_module'"):
        gin_utils.parse_gin([str(bad)])


def test_infer_resolves_embedded_with_the_run_settings(toy_files, clean_gin, monkeypatch):
    """infer ignored `register_tasks.cache_dir` for VOCABULARY_PATH="embedded" (it read only
    the vocabulary size, from gin); it now resolves it as training does."""
    from switch_t5 import infer

    calls = []
    monkeypatch.setattr(corpus, "prepare_embedded_corpus", lambda cache: calls.append(cache))
    spm = toy_files["spm"]
    monkeypatch.setattr(
        corpus, "embedded_vocabulary_path", lambda info, size: calls.append(size) or spm
    )
    gin_utils.parse_gin(
        [],
        [
            "VOCABULARY_PATH = 'embedded'",
            "switch_t5.data_gin.register_tasks.cache_dir = '/tmp/emb_cache'",
            "switch_t5.data_gin.register_tasks.embedded_vocab_size = 1024",
        ],
        finalize=False,
    )
    vocabulary = infer.resolve_vocabulary(None)
    assert calls == ["/tmp/emb_cache", 1024]
    assert vocabulary.sentencepiece_model_file == toy_files["spm"]


def test_feature_keys_have_one_home_importable_without_tensorflow():
    from switch_t5 import run_builder, trainer
    from switch_t5.data import pipeline

    assert pipeline.FEATURE_KEYS is features.FEATURE_KEYS
    lengths = {"inputs": 5, "targets": 3}
    assert run_builder.feature_length("encoder_positions", lengths) == 5
    assert run_builder.feature_length("decoder_loss_weights", lengths) == 3
    assert set(trainer.MODEL_FEATURES) == set(features.FEATURE_KEYS) - {"decoder_loss_weights"}
    code = (
        "import sys; import switch_t5.data.features, switch_t5.data.registry, "
        "switch_t5.data_gin; switch_t5.data_gin.MACROS; "
        "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vocabulary_record_has_one_home(toy_files):

    vocabulary = vocab_lib.get_vocabulary(toy_files["spm"])
    record = vocab_lib.vocabulary_record(vocabulary)
    assert record == vocab_lib.vocabulary_record(vocabulary)
    fingerprint = vocab_lib.vocab_fingerprint(vocabulary)
    assert record == {
        "path": toy_files["spm"],
        "hash": fingerprint.split("sha256=")[-1],
        "fingerprint": fingerprint,
        "size": 132,
    }
