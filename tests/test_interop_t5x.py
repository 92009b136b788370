"""T5X import: the golden Flaxformer layout of switch_base_8, and logit parity with transformers
on a checkpoint written in T5X's layout (msgpack + TensorStore) from an HF model's weights."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from switch_t5 import gin_utils, network
from switch_t5.interop import checkpoint_io, hf, streaming, t5x

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "t5x_switch_base_8_param_shapes.json")


def test_switch_base_8_names_and_shapes_match_the_flaxformer_golden_list():
    gin_utils.parse_gin(["configs/models/switch_base_8.gin"])
    config = gin_utils.make_model_config()
    with open(GOLDEN) as f:
        golden = json.load(f)["param_shapes"]
    assert t5x.expected_shapes(config) == golden


@pytest.mark.slow
def test_t5x_checkpoint_imports_with_transformers_parity(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.test_interop_hf import CONFIGS, batch_for, make_hf_model

    torch.set_num_threads(1)
    kwargs = CONFIGS["e4_steps2and3"] | {"dense_act_fn": "relu", "num_sparse_decoder_layers": 3}
    model = make_hf_model(kwargs, seed=3)
    model.save_pretrained(str(tmp_path / "hf"))
    # HF weights -> our names (load_hf) -> T5X names, written in T5X's on-disk layout.
    _, params = hf.load_hf(str(tmp_path / "hf"), dtype="float32")
    flat = {}
    for name, _leaf in checkpoint_io.abstract_params(
        hf.config_from_hf(
            hf.read_hf_config(str(tmp_path / "hf")),
            streaming.SafetensorsSource(str(tmp_path / "hf")).names(),
            dtype="float32",
        )
    )[0].items():
        node = params
        for part in name.split("/"):
            node = node[part]
        flat[t5x.to_t5x_name(name)] = np.asarray(node)
    assert any("router/router_weights/w/kernel" in k for k in flat)
    t5x.write_t5x_checkpoint(str(tmp_path / "t5x"), flat, step=1000)
    assert os.path.exists(tmp_path / "t5x" / "checkpoint_1000" / "checkpoint")

    t5x.t5x_to_orbax(
        str(tmp_path / "t5x"), str(tmp_path / "ckpt"), dtype="float32", eval_capacity_factor=4.0
    )
    config, imported = checkpoint_io.load_params(str(tmp_path / "ckpt"))
    assert config.num_experts == 4 and config.decoder_sparse_layers == (0, 1, 2)
    assert config.encoder_sparse_layers == (1, 3)
    enc, dec_in, targets = batch_for(kwargs["vocab_size"])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec_in)).logits
    logits = network.EncoderDecoder(config).apply(
        {"params": imported},
        jnp.asarray(enc, jnp.int32),
        jnp.asarray(dec_in, jnp.int32),
        jnp.asarray(targets, jnp.int32),
        enable_dropout=False,
    )
    diff = float(np.max(np.abs(np.asarray(logits)[..., : kwargs["vocab_size"]] - ref.numpy())))
    print(f"t5x import: max |logit difference| = {diff:.2e}")
    assert diff < 1e-4


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no T5X checkpoint"):
        t5x.open_t5x(str(tmp_path))


def test_t5x_import_into_scanned_layers_stacks_the_unscanned_import(tmp_path):
    import jax

    from switch_t5 import scan_utils
    from switch_t5.config import SwitchConfig

    config = SwitchConfig(
        vocab_size=128, d_model=8, num_heads=2, head_dim=3, d_ff=16, num_encoder_layers=2,
        num_decoder_layers=2, num_experts=4, moe_layer_interval=2, dtype="float32",
        relative_attention_num_buckets=32,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    flat = {
        t5x.to_t5x_name(name): rng.normal(size=leaf.shape).astype(np.float32)
        for name, leaf in checkpoint_io.abstract_params(config)[0].items()
    }
    t5x.write_t5x_checkpoint(str(tmp_path / "t5x"), flat, step=10)
    t5x.t5x_to_orbax(str(tmp_path / "t5x"), str(tmp_path / "a"), dtype="float32")
    t5x.t5x_to_orbax(str(tmp_path / "t5x"), str(tmp_path / "b"), dtype="float32",
                     scan_layers=True)  # fmt: skip
    _, ref = checkpoint_io.load_params(str(tmp_path / "a"))
    scanned_config, got = checkpoint_io.load_params(str(tmp_path / "b"))
    assert scanned_config.scan_layers and scan_utils.is_scanned(got)
    jax.tree.map(np.testing.assert_array_equal, scan_utils.unscan_params(got, scanned_config), ref)
