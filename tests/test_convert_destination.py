"""convert: a non-empty --dst is refused (one error naming the folder, what it holds and
--overwrite); --overwrite removes what the conversion would shadow, so only the new weights are
served.

The two failures this prevents: `orbax-to-hf` into a folder holding `model.safetensors` left it
beside the new shards and transformers loaded the old file; `hf-to-orbax` into a trained
MODEL_DIR put `checkpoints/0` under the newer steps, which every command keeps using.
"""

import dataclasses
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

from switch_t5 import checkpoints, convert, init_checkpoint, network
from switch_t5.config import SwitchConfig
from switch_t5.errors import UserError
from switch_t5.interop import checkpoint_io, streaming, t5x

TINY = SwitchConfig(
    vocab_size=256, d_model=8, num_heads=2, head_dim=3, d_ff=16, num_encoder_layers=2,
    num_decoder_layers=2, num_experts=4, moe_layer_interval=2, dtype="float32",
    relative_attention_num_buckets=8,
)  # fmt: skip


def save_run(model_dir, seed, step, config=TINY):
    """A MODEL_DIR as training leaves it: a checkpoint at `step` and the run's files."""
    params = nn.unbox(network.init_variables(config, jax.random.key(seed))["params"])
    ckpt = checkpoints.Checkpointer(str(model_dir), async_save=False)
    ckpt.save(step, {"params": params, "step": np.int32(step)}, {}, checkpoints.make_meta(config))
    ckpt.close()
    (model_dir / "config.gin").write_text("# the old run's config\n")
    (model_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    os.makedirs(model_dir / "best")
    (model_dir / "notes.txt").write_text("mine\n")
    return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "a": (root / "a", save_run(root / "a", seed=1, step=5)),
        "b": (root / "b", save_run(root / "b", seed=2, step=9)),
    }


def _embedding(hf_dir):
    source = streaming.SafetensorsSource(str(hf_dir))
    return source.read("shared.weight", ())


def test_orbax_to_hf_refuses_old_weights_and_overwrite_serves_the_new_ones(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    (a, params_a), (b, params_b) = runs["a"], runs["b"]
    hf_dir = tmp_path / "hf"
    convert.main(["orbax-to-hf", f"--src={a}", f"--dst={hf_dir}", "--no_tokenizer"])
    old_file = tmp_path / "old.safetensors"
    shutil.copy(hf_dir / "model.safetensors", old_file)
    into_old = ["orbax-to-hf", f"--src={b}", f"--dst={hf_dir}", "--no_tokenizer",
                "--max_shard_size=20000"]  # fmt: skip
    with pytest.raises(UserError) as refused:
        convert.main(into_old)
    message = str(refused.value)
    for part in (str(hf_dir), "model.safetensors", "config.json", "--overwrite"):
        assert part in message
    assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors"]  # untouched

    convert.main([*into_old, "--overwrite"])
    files = sorted(os.listdir(hf_dir))
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(str(hf_dir))
    emb_b = params_b["token_embedder"]["embedding"]
    np.testing.assert_array_equal(model.shared.weight.detach().numpy(), emb_b)

    # The original failure: the old single file beside the new shards is what transformers loads
    # (max weight difference 35.9 in the report); the refusal and --overwrite prevent it.
    shutil.copy(old_file, hf_dir / "model.safetensors")
    stale = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(str(hf_dir))
    emb_a = params_a["token_embedder"]["embedding"]
    np.testing.assert_array_equal(stale.shared.weight.detach().numpy(), emb_a)
    assert not np.array_equal(emb_a, emb_b)


def test_hf_to_orbax_into_a_trained_model_dir(runs, tmp_path):
    (a, _), (b, params_b) = runs["a"], runs["b"]
    hf_dir = tmp_path / "hf_b"
    convert.main(["orbax-to-hf", f"--src={b}", f"--dst={hf_dir}", "--no_tokenizer"])
    run = tmp_path / "run"
    shutil.copytree(a, run)
    assert init_checkpoint.find_checkpoint(str(run)).step == 5
    into_run = ["hf-to-orbax", f"--src={hf_dir}", f"--dst={run}", "--dtype=float32"]
    with pytest.raises(UserError) as refused:
        convert.main(into_run)
    message = str(refused.value)
    for part in (str(run), "checkpoints/", "config.gin", "--overwrite"):
        assert part in message
    assert os.listdir(run / "checkpoints") == ["5"]

    convert.main([*into_run, "--overwrite"])
    assert os.listdir(run / "checkpoints") == ["0"]
    for gone in ("config.gin", "metrics.jsonl", "best"):
        assert not os.path.exists(run / gone), gone
    assert (run / "notes.txt").read_text() == "mine\n"  # not the conversion's: kept
    # What infer / eval / train resolve now: the converted step 0 with b's weights.
    assert init_checkpoint.find_checkpoint(str(run)).step == 0
    _, params = checkpoint_io.load_params(str(run))
    np.testing.assert_array_equal(
        params["token_embedder"]["embedding"], params_b["token_embedder"]["embedding"]
    )


def _t5x_dir(path, params):
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            name = f"{prefix}/{k}" if prefix else k
            walk(v, name) if isinstance(v, dict) else flat.update({t5x.to_t5x_name(name): v})

    walk(params, "")
    t5x.write_t5x_checkpoint(str(path), flat, step=3)
    return str(path)


@pytest.mark.parametrize("command", ["t5x-to-orbax", "upcycle"])
def test_every_import_refuses_a_non_empty_dst(command, runs, tmp_path):
    _, params_a = runs["a"]
    if command == "t5x-to-orbax":
        args = [command, f"--src={_t5x_dir(tmp_path / 't5x', params_a)}", "--dtype=float32"]
    else:
        dense = dataclasses.replace(TINY, num_experts=0)
        save_run(tmp_path / "dense", seed=3, step=4, config=dense)
        gin_file = tmp_path / "sparse.gin"
        gin_file.write_text(checkpoint_io.config_to_gin(TINY))
        args = [command, f"--src={tmp_path / 'dense'}", f"--gin_file={gin_file}",
                "--dtype=float32"]  # fmt: skip
    dst = tmp_path / "dst"
    os.makedirs(dst / "checkpoints" / "12")
    with pytest.raises(UserError, match=r"is not empty \(it holds checkpoints/\).*--overwrite"):
        convert.main([*args, f"--dst={dst}"])
    convert.main([*args, f"--dst={dst}", "--overwrite"])
    assert os.listdir(dst / "checkpoints") == ["0"]


def test_overwrite_never_removes_the_source(runs, tmp_path):
    a, params_a = runs["a"]
    run = tmp_path / "run"
    shutil.copytree(a, run)
    src = _t5x_dir(run / "checkpoints" / "t5x", params_a)
    with pytest.raises(UserError, match="holds the source"):
        convert.main(["t5x-to-orbax", f"--src={src}", f"--dst={run}", "--overwrite"])
    with pytest.raises(UserError, match="is the source"):
        convert.main(["orbax-to-hf", f"--src={run}", f"--dst={run}", "--overwrite",
                      "--no_tokenizer"])  # fmt: skip
    assert sorted(os.listdir(run / "checkpoints")) == ["5", "t5x"]


def test_cli_prints_one_error_line(runs, tmp_path, monkeypatch, capsys):
    a, _ = runs["a"]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"old")
    argv = ["convert", "orbax-to-hf", f"--src={a}", f"--dst={tmp_path / 'hf'}", "--no_tokenizer"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        convert.console_main()
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dst ") and "--overwrite" in err[0]
