"""Multilingual mixtures (mC4 and user files): mT5's p(L) ~ n(L)^alpha sampling, the released
mC4 JSON files through a file mapping and a count file, their errors, and mswitch_base.gin.

Five languages of very unequal sizes (10 ... 10,000 documents); each writes only its own four
letters, so every token tells which language an example came from."""

import gzip
import json
import os
import random

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
from scipy import stats

from switch_t5 import data_gin, errors, gin_utils, plan
from switch_t5.data import multilingual as ml
from switch_t5.data import multilingual_tasks as mt
from switch_t5.data import pipeline, tasks
from switch_t5.data import vocab as vocab_lib

SIZES = {"en": 10_000, "de": 3_000, "sw": 1_000, "yo": 100, "haw": 10}
LETTERS = {"en": "abcd", "de": "efgh", "sw": "ijkl", "yo": "mnop", "haw": "qrst"}
LENGTHS = {"inputs": 8, "targets": 4}
TEXT_TASK = tasks.TEXT_FILES_TASK
SAMPLES = 20_000
# chi-square critical value, 4 degrees of freedom, p = 0.001 (any table: 18.467).
CHI2_CRITICAL = 18.467


def _documents(language: str, n: int, rng: random.Random) -> list[str]:
    letters = LETTERS[language]

    def document() -> str:
        words = rng.randint(3, 8)
        return " ".join("".join(rng.sample(letters * 2, rng.randint(2, 5))) for _ in range(words))

    return [document() for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Per-language .txt files (user files) and mC4-style `c4-<lang>.tfrecord-*.json.gz` files,
    their count file, and a 228-id vocabulary whose pieces each belong to one language."""
    root = tmp_path_factory.mktemp("multilingual")
    rng = random.Random(0)
    sample = []
    for language, n in SIZES.items():
        docs = _documents(language, n, rng)
        sample += docs[:300]
        (root / f"{language}.txt").write_text("\n".join(docs) + "\n")
        with gzip.open(root / f"c4-{language}.tfrecord-00000-of-00001.json.gz", "wt") as f:
            f.writelines(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs)
    (root / "counts.json").write_text(json.dumps(SIZES))
    spm = vocab_lib.train_sentencepiece(sample, str(root / "spm.model"), vocab_size=228)
    vocab = vocab_lib.get_vocabulary(spm)
    owner = np.full(vocab.vocab_size, -1)
    for i in range(3, vocab.vocab_size - 100):
        piece = set(vocab.tokenizer.id_to_piece(i).replace("\u2581", ""))
        found = [k for k, lang in enumerate(SIZES) if piece and piece <= set(LETTERS[lang])]
        owner[i] = found[0] if len(found) == 1 else -1
    return {"root": root, "spm": spm, "owner": owner, "cache": str(root / "cache")}


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _register(name: str, cache: str | None = None, **macros) -> None:
    """Registers `name` as a training run does: gin macros -> data_gin.register_tasks."""
    gin_utils.parse_gin([], [f"{k} = {v!r}" for k, v in macros.items()], finalize=False)
    if cache:
        gin.bind_parameter("switch_t5.data_gin.register_tasks.cache_dir", cache)
    gin.bind_parameter("switch_t5.data_gin.register_tasks.shuffle_buffer_size", 16)
    data_gin.register_tasks(name)


def _text_macros(corpus, **extra) -> dict:
    files = {lang: str(corpus["root"] / f"{lang}.txt") for lang in SIZES}
    return {"TEXT_FILES": files, "VOCABULARY_PATH": corpus["spm"], **extra}


def _expected(alpha: float) -> np.ndarray:
    weights = np.array([n**alpha for n in SIZES.values()], dtype=np.float64)
    return weights / weights.sum()


def _languages(batch_tokens: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """The language index of each row: the one language all its known tokens belong to."""
    owners = owner[batch_tokens]
    known = np.where(owners >= 0, owners, -1)
    first = known.max(axis=1)
    assert (first >= 0).all(), "a row without any language's token"
    mixed = ((known >= 0) & (known != first[:, None])).any(axis=1)
    assert not mixed.any(), "a row mixes languages"
    return first


# ------------------------------------------------------------------------------ the rates


def test_sampling_rates_are_n_to_the_alpha():
    rates = ml.sampling_rates(SIZES, 0.3)
    assert list(rates) == list(SIZES)
    np.testing.assert_allclose(list(rates.values()), _expected(0.3), rtol=1e-12)
    np.testing.assert_allclose(list(ml.sampling_rates(SIZES, 1.0).values()), _expected(1.0))
    # mC4-sized counts (English ~3.9e9 documents) and a large alpha do not overflow.
    huge = ml.sampling_rates({"en": 3_928_733_374, "yo": 46_214}, 50.0)
    assert huge["en"] == pytest.approx(1.0) and huge["yo"] >= 0.0


@pytest.mark.parametrize("alpha", [0, -0.3, float("nan"), "0.3", True, None])
def test_bad_alpha_is_one_user_error(alpha):
    with pytest.raises(ml.MultilingualError, match=r"MC4_ALPHA=.* must be a number > 0"):
        ml.sampling_rates(SIZES, alpha)


def test_mc4_languages_are_tfds_splits():
    """The one list: TFDS c4/multilingual's 107 languages (101 + six romanised variants)."""
    import ast
    import re

    import tensorflow_datasets

    source = os.path.join(os.path.dirname(tensorflow_datasets.__file__), "text", "c4.py")
    with open(source) as f:
        tfds_list = ast.literal_eval(re.search(r"MC4_LANGUAGES = (\[.*?\])", f.read(), re.S)[1])
    assert list(ml.MC4_LANGUAGES) == tfds_list
    assert len({lang.split("-")[0] for lang in ml.MC4_LANGUAGES}) == 101
    assert ml.language_task_name(ml.MC4_TASK, "ru-Latn") == "mc4_span_corruption.ru_Latn"


# ------------------------------------------------------------- sampled proportions (seqio)


def _sample_languages(mixture_name: str, n: int, seed: int) -> np.ndarray:
    """The language index (in SIZES) of the first n examples of the registered mixture's
    training stream.

    seqio's `Mixture.get_dataset` (what `seqio.get_dataset`, hence the input pipeline, calls)
    samples with the registered rates; only each task's stream is replaced by one tagged with
    its language (tokenizing and corrupting 20k examples takes ~30 s on 2 cores; the end-to-end
    stream is checked below)."""
    mixture = seqio.get_mixture_or_task(mixture_name)
    index = {ml.language_task_name(mixture_name, lang): k for k, lang in enumerate(SIZES)}
    assert sorted(t.name for t in mixture.tasks) == sorted(index)

    def tagged(self, task, *args, **kwargs):
        del self, args, kwargs
        k = index[task.name]
        return tf.data.Dataset.from_tensors({"inputs": [k], "targets": [k]}).repeat()

    original = seqio.Mixture.get_task_dataset
    seqio.Mixture.get_task_dataset = tagged
    try:
        ds = mixture.get_dataset(LENGTHS, "train", shuffle=True, seed=seed, num_epochs=None)
        batch = next(ds.batch(n).as_numpy_iterator())
    finally:
        seqio.Mixture.get_task_dataset = original
    return batch["inputs"][:, 0]


def _chi2(observed: np.ndarray, p: np.ndarray) -> float:
    counts = np.bincount(observed, minlength=len(p))
    return float(((counts - p * counts.sum()) ** 2 / (p * counts.sum())).sum())


@pytest.mark.parametrize("alpha, other", [(0.3, 1.0), (1.0, 0.3)])
def test_text_files_mixture_samples_n_to_the_alpha(corpus, clean_gin, alpha, other):
    """20k examples: the chi-square statistic against n^alpha is below the p = 0.001 critical
    value, and against the other alpha's proportions far above it."""
    _register(TEXT_TASK, corpus["cache"], **_text_macros(corpus, MC4_ALPHA=alpha))
    # Training documents (1% held out for validation by a hash of each document), as the
    # registration counted them (its cached conversion is read back).
    files = _text_macros(corpus)["TEXT_FILES"]
    counts = {
        lang: tasks.prepare_text_files(files[lang], cache_dir=corpus["cache"])["train_documents"]
        for lang in SIZES
    }
    assert all(0 < SIZES[k] - n <= max(1, 0.03 * SIZES[k]) for k, n in counts.items()), counts
    observed = _sample_languages(TEXT_TASK, SAMPLES, seed=1)
    expected = np.array(list(ml.sampling_rates(counts, alpha).values()))
    wrong = np.array(list(ml.sampling_rates(counts, other).values()))
    assert stats.chi2.ppf(0.999, df=len(SIZES) - 1) == pytest.approx(CHI2_CRITICAL, abs=1e-3)
    assert _chi2(observed, expected) < CHI2_CRITICAL
    assert _chi2(observed, wrong) > 100 * CHI2_CRITICAL


def test_mc4_json_files_mixture_samples_n_to_the_alpha(corpus, clean_gin):
    """mc4_span_corruption over the released-files layout, rates from the count file."""
    root = corpus["root"]
    _register(
        ml.MC4_TASK,
        MC4_LANGUAGES=list(SIZES),
        MC4_FILES=str(root / "c4-{lang}.tfrecord-*.json.gz"),
        MC4_COUNTS=str(root / "counts.json"),
        VOCABULARY_PATH=corpus["spm"],
    )
    mixture = seqio.get_mixture_or_task(ml.MC4_TASK)
    rates = [mixture.get_rate(seqio.get_mixture_or_task(f"{ml.MC4_TASK}.{k}")) for k in SIZES]
    np.testing.assert_allclose(rates, _expected(0.3), rtol=1e-12)
    observed = _sample_languages(ml.MC4_TASK, SAMPLES, seed=2)
    assert _chi2(observed, _expected(0.3)) < CHI2_CRITICAL
    assert _chi2(observed, _expected(1.0)) > 100 * CHI2_CRITICAL


# ---------------------------------------------------------- the whole training input stream


def test_mc4_files_train_stream_resumes_exactly(corpus, clean_gin):
    """The input pipeline over the JSON files of two languages: span-corrupted examples of
    both, one language per example, and an exact resume (the JSON parsing step and the mixture's
    sampling are checkpointed)."""
    root = corpus["root"]
    two = ["en", "haw"]
    _register(
        ml.MC4_TASK,
        MC4_LANGUAGES=two,
        MC4_FILES={lang: str(root / f"c4-{lang}.tfrecord-*.json.gz") for lang in two},
        MC4_COUNTS=SIZES,
        VOCABULARY_PATH=corpus["spm"],
    )
    args = dict(global_batch_size=64, seed=5, pack=False, host_index=0, num_hosts=1)
    p = pipeline.InputPipeline(ml.MC4_TASK, "train", LENGTHS, **args)
    first = [next(p) for _ in range(2)]
    state = json.loads(json.dumps(p.get_state()))
    rest = [next(p) for _ in range(2)]
    p.set_state(state)  # what a restarted run does (a fresh pipeline would only trace again)
    for a, b in zip(rest, [next(p) for _ in range(2)], strict=True):
        np.testing.assert_array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])
    tokens = np.concatenate([b["encoder_input_tokens"] for b in first + rest])
    assert set(_languages(tokens, corpus["owner"])) == {0, 4}  # en and haw
    sentinel = 227  # <extra_id_0>
    assert (np.concatenate([b["decoder_target_tokens"] for b in first])[:, 0] == sentinel).all()
    # One document in 1,000 is held out for validation when no validation files are given.
    source = seqio.get_mixture_or_task("mc4_span_corruption.en").source
    held = list(source.get_dataset("validation", shuffle=False).as_numpy_iterator())
    assert 0 < len(held) < 30


def test_count_command_writes_the_count_file(corpus, tmp_path, capsys):
    out = tmp_path / "counts.json"
    template = str(corpus["root"] / "c4-{lang}.tfrecord-*.json.gz")
    ml.main(["--files", template, "--languages", "yo,haw", "--output", str(out)])
    assert ml.read_counts(str(out)) == {"yo": 100, "haw": 10}
    assert "110 documents in 2 languages" in capsys.readouterr().err


def test_single_language_task_needs_no_counts(corpus, clean_gin):
    _register(
        "mc4_span_corruption.de",
        MC4_FILES=str(corpus["root"] / "c4-{lang}.tfrecord-*.json.gz"),
        VOCABULARY_PATH=corpus["spm"],
    )
    task = seqio.get_mixture_or_task("mc4_span_corruption.de")
    text = next(task.source.get_dataset("train", shuffle=False).as_numpy_iterator())["text"]
    assert set(text.decode().replace(" ", "")) <= set(LETTERS["de"])


def test_mc4_tfds_source_by_default(corpus):
    mt.register_mc4_tasks(vocabulary_path=corpus["spm"], tfds_data_dir="/nonexistent/tfds")
    mixture = seqio.get_mixture_or_task(ml.MC4_TASK)
    assert len(mixture.tasks) == 107
    source = seqio.get_mixture_or_task("mc4_span_corruption.ru_Latn").source
    assert source.tfds_dataset.name == "c4/multilingual:3.0.1"
    assert source.splits == ("train", "validation")
    split_map = source.tfds_dataset._split_map  # seqio keeps no public name for it
    assert split_map == {"train": "ru-Latn", "validation": "ru-Latn-validation"}


# ----------------------------------------------------------------------------- the errors


def _error(corpus, name=ml.MC4_TASK, **macros) -> str:
    gin.clear_config()
    with pytest.raises(ml.MultilingualError) as e:
        _register(name, corpus["cache"], **{"VOCABULARY_PATH": corpus["spm"], **macros})
    text = gin_utils.format_error(e.value)  # what the entry points print
    assert "\n" not in text
    return text


def test_errors_name_the_setting_and_fix(corpus, clean_gin):
    root = corpus["root"]
    template = str(root / "c4-{lang}.tfrecord-*.json.gz")
    text = _error(corpus, MC4_LANGUAGES=["en", "fr"], MC4_FILES=template, MC4_COUNTS=SIZES)
    assert "MC4_COUNTS has no document count for 'fr'" in text
    text = _error(
        corpus, MC4_LANGUAGES=["en", "fr"], MC4_FILES=template, MC4_COUNTS={"en": 5, "fr": 5}
    )
    assert "MC4_FILES['fr']" in text and "matches no file" in text
    missing = _raised(corpus, MC4_LANGUAGES=["fr"], MC4_FILES=template, MC4_COUNTS={"fr": 5})
    assert isinstance(missing, FileNotFoundError)
    text = _error(corpus, MC4_LANGUAGES=["en"], MC4_FILES=template)
    assert "MC4_COUNTS is not" in text
    text = _error(corpus, MC4_LANGUAGES=["xx"])
    assert "'xx' is not an mC4 language" in text
    text = _error(corpus, MC4_ALPHA=0.0)
    assert "MC4_ALPHA=0.0 must be a number > 0" in text
    text = _error(corpus, MC4_LANGUAGES=["en"], MC4_FILES=template, MC4_COUNTS="/no/counts.json")
    assert "MC4_COUNTS file '/no/counts.json' does not exist" in text
    assert "mc4_span_corruption.xx" in _error(corpus, name="mc4_span_corruption.xx")
    files = _text_macros(corpus)["TEXT_FILES"]
    text = _error(corpus, TEXT_TASK, TEXT_FILES={**files, "fr": str(root / "fr*.txt")})
    assert "language 'fr': TEXT_FILES" in text and "matches no file" in text
    text = _error(corpus, TEXT_TASK, TEXT_FILES=files, MC4_ALPHA=-1)
    assert "MC4_ALPHA=-1 must be a number > 0" in text
    gin.clear_config()
    with pytest.raises(errors.UserError, match=r"TEXT_FILES maps the languages \['en',"):
        _register(f"{TEXT_TASK}.fr", corpus["cache"], **_text_macros(corpus))


def _raised(corpus, **macros) -> BaseException:
    gin.clear_config()
    with pytest.raises(ml.MultilingualError) as e:
        _register(ml.MC4_TASK, VOCABULARY_PATH=corpus["spm"], **macros)
    return e.value


def test_default_vocabulary_offline_is_one_line_naming_it(clean_gin):
    """mT5's vocabulary is the default; offline, the error the entry points print names it."""
    with pytest.raises(vocab_lib.VocabularyFileError) as e:
        _register(ml.MC4_TASK)
    text = gin_utils.format_error(e.value)
    assert "\n" not in text
    assert text.startswith(f"error: cannot read vocabulary file '{ml.MC4_VOCABULARY_PATH}'")
    assert "copy the file to a local path" in text


def test_single_glob_text_files_unchanged(corpus, clean_gin):
    _register(
        TEXT_TASK,
        corpus["cache"],
        **_text_macros(corpus, TEXT_FILES=str(corpus["root"] / "yo.txt")),
    )
    assert TEXT_TASK in seqio.TaskRegistry.names()
    assert TEXT_TASK not in seqio.MixtureRegistry.names()


# ------------------------------------------------------------------------- mswitch_base.gin

MSWITCH = "configs/experiments/mswitch_base.gin"


def test_mswitch_base_gin(clean_gin):
    gin_utils.parse_gin([MSWITCH], ["MODEL_DIR = '/tmp/mswitch'"])
    config = gin_utils.make_model_config()
    assert gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value") == ml.MC4_TASK
    assert config.vocab_size == 250_112  # 250,100 ids padded to a multiple of 128
    assert config.mlp_activations == ("gelu", "linear") and config.d_ff == 2048
    assert not config.logits_via_embedding
    assert (config.num_experts, config.moe_layer_interval) == (128, 2)
    model_plan = plan.plan_model(config)
    # 12 sparse layers of 127 extra gated-GELU experts (3 * 768 * 2048 each) and a [768, 128]
    # router over the dense twin, mT5-Base (580M in arXiv 2010.11934 Table 1; 582.4M here).
    dense = 582_401_280
    assert model_plan.total_params == dense + 12 * (127 * 3 * 768 * 2048 + 768 * 128)
    assert model_plan.active_params_per_token == dense + 12 * 768 * 128
    assert abs(dense / 580e6 - 1) < 0.005
    gin.clear_config()
    twin = ("MODEL_DIR = '/tmp/mt5'", "NUM_EXPERTS = 0", "switch_t5.SwitchConfig.init_scale = 1.0")
    gin_utils.parse_gin([MSWITCH], twin)
    assert plan.plan_model(gin_utils.make_model_config()).total_params == dense
