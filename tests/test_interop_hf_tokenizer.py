"""HF export writes the run's tokenizer; HF import records it as the run's vocabulary.

Before: an export had no tokenizer files, and `AutoTokenizer.from_pretrained(export_dir)` built a
104-id tokenizer mapping text to <unk>; an import recorded no vocabulary, so infer on the
imported run failed for want of one. Now the export's tokenizer gives exactly the ids of the
run's seqio vocabulary (a SentencePiece model trained here, 100 extra ids).
"""

import dataclasses
import json
import os
import string

import jax
import numpy as np
import pytest
from flax import linen as nn

transformers = pytest.importorskip("transformers")

from switch_t5 import checkpoints, convert, infer, init_checkpoint, network  # noqa: E402
from switch_t5.config import SwitchConfig  # noqa: E402
from switch_t5.data import vocab  # noqa: E402
from switch_t5.data import vocab as vocab_lib  # noqa: E402
from switch_t5.errors import UserError  # noqa: E402

TINY = SwitchConfig(
    vocab_size=256, d_model=8, num_heads=2, head_dim=3, d_ff=16, num_encoder_layers=2,
    num_decoder_layers=2, num_experts=4, moe_layer_interval=2, dtype="float32",
    relative_attention_num_buckets=8,
)  # fmt: skip
WORDS = ["the", "cat", "sings", "hello", "world", "naïve", "café", "über", "straße", "日本"]
TEXTS = [
    "the cat sings",
    "  leading spaces",
    " one leading space",
    "naïve café über straße 日本",
    "hello <extra_id_0> world",
    "<extra_id_0> starts",
    "ends with <extra_id_1>",
    "a <extra_id_0> b <extra_id_99> café",
]


def train_vocabulary(path, seed=0):
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    rng = np.random.default_rng(seed)
    docs = [" ".join([*rng.choice(WORDS, 8), *rng.choice(chars, 6)]) for _ in range(300)]
    return vocab.train_sentencepiece(docs, str(path), vocab_size=100 + 150, seed=seed)


def save_run(model_dir, vocabulary=None):
    params = nn.unbox(network.init_variables(TINY, jax.random.key(0))["params"])
    record = vocab_lib.vocabulary_record(vocabulary) if vocabulary is not None else None
    ckpt = checkpoints.Checkpointer(str(model_dir), async_save=False)
    ckpt.save(3, {"params": params, "step": np.int32(3)}, {}, checkpoints.make_meta(TINY, record))
    ckpt.close()
    return str(model_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    vocabulary = vocab.get_vocabulary(train_vocabulary(root / "spm.model"))
    run = save_run(root / "run", vocabulary)
    convert.main(["orbax-to-hf", f"--src={run}", f"--dst={root / 'hf'}"])
    return vocabulary, run, str(root / "hf")


def test_export_writes_a_tokenizer_with_the_vocabulary_ids(exported):
    vocabulary, _, hf_dir = exported
    assert {"spiece.model", "tokenizer_config.json", "tokenizer.json"} <= set(os.listdir(hf_dir))
    with open(os.path.join(hf_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["legacy"] is False and config["extra_ids"] == 100
    assert config["additional_special_tokens"][0] == "<extra_id_0>"
    assert (config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "</s>", "<pad>", "<unk>"
    )  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert len(tokenizer) == vocabulary.vocab_size == 250
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == 249
    for text in TEXTS:
        want = [int(i) for i in vocabulary.encode(text)]  # seqio adds no EOS
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == want, text
        assert vocab.UNK_ID not in ids
        decoded = tokenizer.decode(ids)
        if "<extra_id_" in text:
            # HF's T5 decoding writes no space before a sentinel; the text maps back to the ids.
            assert tokenizer(decoded, add_special_tokens=False)["input_ids"] == want, text
            assert decoded.replace(" ", "") == text.replace(" ", ""), text
        else:
            assert decoded == vocabulary.decode(want) == text.strip(), text


def test_export_refuses_without_a_known_vocabulary(exported, tmp_path):
    vocabulary, _, _ = exported
    run = save_run(tmp_path / "run")  # records no vocabulary (e.g. converted from T5X)
    # The original failure: weights alone, and transformers builds a tokenizer without the
    # vocabulary that maps text to <unk>.
    convert.main(["orbax-to-hf", f"--src={run}", f"--dst={tmp_path / 'bare'}", "--no_tokenizer"])
    assert not os.path.exists(tmp_path / "bare" / "tokenizer.json")
    bare = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bare"))
    assert len(bare) == 104

    with pytest.raises(
        UserError, match=r"records no vocabulary.*--vocabulary_path.*--no_tokenizer"
    ):
        convert.main(["orbax-to-hf", f"--src={run}", f"--dst={tmp_path / 'hf'}"])
    not_spm = tmp_path / "vocab.txt"
    not_spm.write_text("the\ncat\n")
    with pytest.raises(UserError, match=r"vocab\.txt is not a SentencePiece model"):
        convert.main(["orbax-to-hf", f"--src={run}", f"--dst={tmp_path / 'hf'}",
                      f"--vocabulary_path={not_spm}"])  # fmt: skip
    spm = vocabulary.sentencepiece_model_file
    convert.main(["orbax-to-hf", f"--src={run}", f"--dst={tmp_path / 'hf'}",
                  f"--vocabulary_path={spm}"])  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer(TEXTS[3], add_special_tokens=False)["input_ids"] == vocabulary.encode(TEXTS[3])


def test_export_refuses_another_vocabulary_than_the_recorded_one(exported, tmp_path):
    _, run, _ = exported
    other = train_vocabulary(tmp_path / "other.model", seed=1)
    with pytest.raises(UserError, match="is not the one the checkpoint"):
        convert.main(["orbax-to-hf", f"--src={run}", f"--dst={tmp_path / 'hf'}",
                      f"--vocabulary_path={other}"])  # fmt: skip
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")  # refused before writing


def test_import_records_the_hf_tokenizer_and_infer_uses_it(exported, tmp_path):
    vocabulary, _, hf_dir = exported
    model_dir = tmp_path / "imported"
    convert.main(["hf-to-orbax", f"--src={hf_dir}", f"--dst={model_dir}", "--dtype=float32"])
    ref = init_checkpoint.find_checkpoint(str(model_dir))
    record = ref.meta["vocabulary"]
    assert record["path"] == str(model_dir / "spiece.model")
    assert record["hash"] == vocab_lib.vocabulary_record(vocabulary)["hash"]
    assert "|extra_ids=100|" in record["fingerprint"] and record["size"] == 250
    # What infer does from the run alone (before: "records the vocabulary None", an error),
    # and the hash check eval and load_model make against a task's vocabulary.
    resolved = infer.resolve_vocabulary(ref)
    assert resolved.sentencepiece_model_file == record["path"]
    assert list(resolved.encode(TEXTS[7])) == list(vocabulary.encode(TEXTS[7]))
    init_checkpoint.check_vocabulary(ref, vocab_lib.vocabulary_record(vocabulary))


def test_import_without_spiece_model_says_so(exported, tmp_path, capsys):
    _, _, hf_dir = exported
    bare = tmp_path / "hf"
    os.makedirs(bare)
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(hf_dir, name), bare / name)
    convert.main(["hf-to-orbax", f"--src={bare}", f"--dst={tmp_path / 'run'}"])
    assert "no vocabulary recorded" in capsys.readouterr().out
    assert init_checkpoint.find_checkpoint(str(tmp_path / "run")).meta["vocabulary"] == {}


def test_tokenizer_config_of_another_extra_ids_count_is_not_recorded(exported, tmp_path):
    _, _, hf_dir = exported
    src = tmp_path / "hf"
    os.makedirs(src)
    for name in ("config.json", "model.safetensors", "spiece.model"):
        os.link(os.path.join(hf_dir, name), src / name)
    (src / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 50}))
    stats = convert.main(["hf-to-orbax", f"--src={src}", f"--dst={tmp_path / 'run'}"])
    assert any("50 extra ids" in n for n in stats.notes)
    assert not dataclasses.asdict(stats)["notes"][0].startswith("vocabulary:")
