"""HF SwitchTransformers' sparse-layer rule on import and export, against transformers itself.

transformers makes block i of a stack sparse when `i % sparse_step == 1` (every block for step
1, none for step 0); `sparse_step` is config.json's explicit `*_sparse_step` when present, else
`num_layers // num_sparse_layers` (`num_layers` for 0 sparse layers). Our sets must equal
`[i for i, b in enumerate(stack.block) if b.is_sparse]` of the model transformers builds.
"""

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from switch_t5.config import SwitchConfig, sparse_layers_every  # noqa: E402
from switch_t5.errors import UserError  # noqa: E402
from switch_t5.interop import hf  # noqa: E402

TINY_HF = dict(vocab_size=8, d_model=2, d_kv=1, d_ff=2, num_heads=1, num_experts=2)


def transformers_sparse_sets(config_json: dict) -> dict[str, tuple[int, ...]]:
    """The sparse blocks of the model transformers builds from a config.json dict."""
    config = transformers.SwitchTransformersConfig.from_dict(dict(config_json))
    with torch.device("meta"):
        model = transformers.SwitchTransformersForConditionalGeneration(config)
    return {
        "encoder": tuple(i for i, b in enumerate(model.encoder.block) if b.is_sparse),
        "decoder": tuple(i for i, b in enumerate(model.decoder.block) if b.is_sparse),
    }


def _grid():
    # (encoder layers, num_sparse_encoder_layers, encoder step) paired with a decoder setting,
    # so one model checks two grid points; step None = no explicit step in config.json.
    points = [
        (n, k, step) for n in range(1, 7) for k in range(n + 1) for step in (None, 1, 2, 3, 4)
    ]
    return list(zip(points, points[::-1]))


@pytest.mark.parametrize("enc, dec", _grid())
def test_import_sparse_sets_equal_transformers(enc, dec):
    cfg = dict(TINY_HF, model_type="switch_transformers")
    for stack, (n, k, step) in (("encoder", enc), ("decoder", dec)):
        cfg["num_layers" if stack == "encoder" else "num_decoder_layers"] = n
        cfg[f"num_sparse_{stack}_layers"] = k
        if step is not None:
            cfg[f"{stack}_sparse_step"] = step
    expected = transformers_sparse_sets(cfg)
    for stack in ("encoder", "decoder"):
        assert hf.hf_sparse_layers(cfg, stack) == expected[stack], (stack, cfg)


def test_import_accepts_an_explicit_step(tmp_path):
    """Was refused: "weights have routers in blocks (1, 3) but config.json ... puts sparse
    layers at (0, 1, 2, 3)" (num_sparse_encoder_layers=4 with encoder_sparse_step=2)."""
    config = transformers.SwitchTransformersConfig(
        **TINY_HF, num_layers=4, num_decoder_layers=2, num_sparse_encoder_layers=4,
        num_sparse_decoder_layers=1, encoder_sparse_step=2, relative_attention_num_buckets=4,
    )  # fmt: skip
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["encoder_sparse_step"] == 2 and saved["num_sparse_encoder_layers"] == 4
    ours, _ = hf.load_hf(str(tmp_path), dtype="float32")
    assert ours.config.sparse_layers("encoder") == (1, 3)
    assert ours.config.sparse_layers("decoder") == (1,)


def test_import_refuses_weights_of_another_layout(tmp_path):
    config = transformers.SwitchTransformersConfig(
        **TINY_HF, num_layers=4, num_decoder_layers=2, num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=1, relative_attention_num_buckets=4,
    )  # fmt: skip
    transformers.SwitchTransformersForConditionalGeneration(config).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["encoder_sparse_step"] = 1  # transformers would build routers in every block
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"encoder: the weights have routers in blocks \(1, 3\)"):
        hf.load_hf(str(tmp_path))


BASE = SwitchConfig(
    vocab_size=128, d_model=8, num_heads=2, head_dim=3, d_ff=16, num_encoder_layers=2,
    num_decoder_layers=2, num_experts=2, dtype="float32",
)  # fmt: skip


def _our_layouts():
    out = []
    for n in range(1, 7):
        layouts = {sparse_layers_every(n, i) for i in (1, 2, 3, 4)}
        layouts |= {tuple(i for i in range(n) if i % s == 1) for s in (2, 3, 4, 5)}
        out += [(n, layout) for layout in sorted(layouts) if layout]
    return out


@pytest.mark.parametrize("n, layout", _our_layouts())
def test_export_writes_a_config_transformers_reads_back(n, layout):
    config = dataclasses.replace(
        BASE, num_encoder_layers=n, num_decoder_layers=7 - n, encoder_sparse_layers=layout,
        decoder_sparse_layers=(),
    )  # fmt: skip
    try:
        cfg = hf.hf_config_from_ours(config)
    except hf.UnsupportedFeatureError as e:
        # Only layouts that no step gives are refused.
        assert all(
            tuple(i for i in range(n) if (i % s == 1 or s == 1)) != layout for s in range(1, 9)
        ), e
        return
    got = transformers_sparse_sets(cfg)
    assert got == {"encoder": layout, "decoder": ()}
    assert hf.hf_sparse_layers(cfg, "encoder") == layout
    assert hf.hf_sparse_layers(cfg, "decoder") == ()
