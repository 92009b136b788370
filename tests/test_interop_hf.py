"""HF SwitchTransformers interop: logit and greedy parity, round trips, export refusals.

Random-weight HF models in several small configs (experts 2/4/8, sparse steps 1/2/3/4, odd
d_model, vocabularies that are not multiples of 128). Routers are scaled up x4 so that routing
is decisive (random routers are nearly uniform), and every sparse layer must route tokens to at
least two experts. Capacity is set so that nothing is dropped on either side (HF: 64 per
sequence; ours: eval_capacity_factor = num_experts), where the two routings agree.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from switch_t5 import checkpoints, decoding, moe, network, optim, train_state  # noqa: E402
from switch_t5.config import SwitchConfig  # noqa: E402
from switch_t5.interop import checkpoint_io, hf, streaming  # noqa: E402

torch.set_num_threads(1)

# (name, HF config kwargs): experts, per-stack sparse layout, odd d_model, vocab % 128 != 0.
CONFIGS = {
    "e2_steps1and2": dict(
        vocab_size=300, d_model=9, d_kv=3, d_ff=16, num_heads=2, num_experts=2,
        num_layers=2, num_sparse_encoder_layers=2, num_decoder_layers=2,
        num_sparse_decoder_layers=1,
    ),
    "e4_steps2and3": dict(
        vocab_size=517, d_model=11, d_kv=3, d_ff=14, num_heads=3, num_experts=4,
        num_layers=4, num_sparse_encoder_layers=2, num_decoder_layers=3,
        num_sparse_decoder_layers=1, dense_act_fn="gelu_new",
    ),
    "e8_steps4and1_untied": dict(
        vocab_size=1000, d_model=13, d_kv=5, d_ff=18, num_heads=2, num_experts=8,
        num_layers=4, num_sparse_encoder_layers=1, num_decoder_layers=2,
        num_sparse_decoder_layers=2, tie_word_embeddings=False,
    ),
}  # fmt: skip
BATCH, INPUTS, TARGETS = 3, 9, 7
TOLERANCE = 1e-4  # float32 logits; the parity bound (different summation orders)


def make_hf_model(kwargs, seed=0):
    torch.manual_seed(seed)
    defaults = dict(expert_capacity=64, relative_attention_num_buckets=8, dropout_rate=0.0)
    cfg = transformers.SwitchTransformersConfig(**{**defaults, **kwargs})
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    # transformers 5 unties the input embeddings from `shared` with tie_word_embeddings=False;
    # T5/Switch share them (the import refuses separate ones).
    model.set_input_embeddings(model.shared)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router.classifier" in name:
                p.mul_(4.0)  # decisive routing
    return model


def batch_for(vocab, seed=1):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab, (BATCH, INPUTS))
    targets = rng.integers(2, vocab, (BATCH, TARGETS))
    dec_in = np.concatenate([np.zeros((BATCH, 1), np.int64), targets[:, :-1]], axis=1)
    return enc, dec_in, targets


def experts_used_by_hf(model, vocab):
    """Experts receiving tokens of the test batch in each HF sparse layer (forward hooks)."""
    used = []
    router_cls = (
        transformers.models.switch_transformers.modeling_switch_transformers
    ).SwitchTransformersTop1Router

    def hook(_module, _inputs, out):
        used.append(int((out[0].sum((0, 1)) > 0).sum()))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, router_cls)]
    enc, dec_in, _ = batch_for(vocab)
    with torch.no_grad():
        model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec_in))
    for h in hooks:
        h.remove()
    return used


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    kwargs = CONFIGS[request.param]
    # The first seed whose (scaled) routers send the test batch to >= 2 experts in every sparse
    # layer; the test below checks the same on our side.
    for seed in range(20):
        model = make_hf_model(kwargs, seed)
        if min(experts_used_by_hf(model, kwargs["vocab_size"])) >= 2:
            break
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    ours, params = hf.load_hf(
        path, dtype="float32", eval_capacity_factor=float(kwargs["num_experts"])
    )
    return request.param, kwargs, model, path, ours, params


@pytest.mark.slow
def test_logits_match_transformers(converted):
    name, kwargs, model, _, ours, params = converted
    vocab = kwargs["vocab_size"]
    enc, dec_in, targets = batch_for(vocab)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec_in)).logits
    logits, state = ours.apply(
        {"params": params},
        jnp.asarray(enc, jnp.int32),
        jnp.asarray(dec_in, jnp.int32),
        jnp.asarray(targets, jnp.int32),
        enable_dropout=False,
        mutable=["intermediates"],
    )
    assert logits.shape == (BATCH, TARGETS, ours.config.vocab_size)
    assert ours.config.vocab_size % 128 == 0 and ours.config.vocab_size >= vocab
    diff = float(np.max(np.abs(np.asarray(logits)[..., :vocab] - ref.numpy())))
    print(f"{name}: max |logit difference| = {diff:.2e}")
    assert diff < TOLERANCE
    stats = moe.collect_moe_intermediates(state["intermediates"])
    used = np.asarray(stats["tokens_per_expert"]) > 0
    n_sparse = len(ours.config.sparse_layers("encoder")) + len(ours.config.sparse_layers("decoder"))
    assert used.shape[0] == n_sparse
    assert (used.sum(axis=1) >= 2).all(), f"a sparse layer routed to a single expert: {used}"
    assert float(stats["fraction_dropped"]) == 0.0


def test_sparse_layers_follow_hf_rule(converted):
    _, _kwargs, model, _, ours, _ = converted
    for stack, hf_stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        hf_sparse = tuple(i for i, b in enumerate(hf_stack.block) if b.is_sparse)
        assert ours.config.sparse_layers(stack) == hf_sparse


def test_greedy_generation_matches_transformers(converted):
    _, kwargs, model, _, ours, params = converted
    vocab, length = kwargs["vocab_size"], 6
    enc, _, _ = batch_for(vocab, seed=2)
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(enc), max_new_tokens=length, do_sample=False, num_beams=1,
            decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
        ).numpy()[:, 1:]  # fmt: skip
    ref = np.pad(ref, ((0, 0), (0, length - ref.shape[1])))
    enc_j = jnp.asarray(enc, jnp.int32)
    encoded = ours.apply({"params": params}, enc_j, enable_dropout=False, method="encode")
    cache = network.init_decode_cache(
        ours.config, batch=BATCH, max_decode_length=length, inputs_length=INPUTS
    )

    def tokens_to_logits(state):
        logits, variables = ours.apply(
            {"params": params, "cache": state.cache}, encoded, enc_j, state.cur_token[:, None],
            enable_dropout=False, decode=True, max_decode_length=length, mutable=["cache"],
            method="decode",
        )  # fmt: skip
        # Padded vocabulary rows are not tokens of the HF model.
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits[:, 0], decoding.NEG_INF)
        return logits, variables["cache"]

    tokens, _ = decoding.greedy_decode(
        tokens_to_logits, cache, batch_size=BATCH, max_decode_length=length
    )
    np.testing.assert_array_equal(np.asarray(tokens), ref)


def _safetensors(path):
    src = streaming.SafetensorsSource(path)
    return {n: src.read(n, ()) for n in src.names()}


def test_hf_orbax_hf_round_trip_is_bit_exact(converted, tmp_path):
    _name, kwargs, _model, path, _, _ = converted
    hf.hf_to_orbax(path, str(tmp_path / "ckpt"), dtype="float32")
    gin_text = (tmp_path / "ckpt" / "model.gin").read_text()
    assert f"switch_t5.SwitchConfig.num_experts = {kwargs['num_experts']}" in gin_text
    hf.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), tokenizer=False)
    a, b = _safetensors(path), _safetensors(str(tmp_path / "back"))
    a = {k: v for k, v in a.items() if not k.endswith("embed_tokens.weight")}
    if kwargs.get("tie_word_embeddings", True):
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["vocab_size"] == kwargs["vocab_size"]


# ---------------------------------------------------------------------------------------------
# orbax (a checkpoint as training writes it) -> HF -> orbax.
# ---------------------------------------------------------------------------------------------

TINY = SwitchConfig(
    vocab_size=256, d_model=8, num_heads=2, head_dim=3, d_ff=16, num_encoder_layers=2,
    num_decoder_layers=3, num_experts=4, moe_layer_interval=2, dtype="float32",
    relative_attention_num_buckets=8, eval_capacity_factor=4.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained_style_checkpoint(tmp_path_factory):
    """A checkpoint written by `checkpoints.Checkpointer`, as `train` does (OCDBT layout)."""
    model_dir = str(tmp_path_factory.mktemp("trained"))
    params = jax.tree.map(np.asarray, network.init_variables(TINY, jax.random.key(3))["params"])
    from flax import linen as nn

    params = nn.unbox(params)
    tx = optim.make_optimizer("adafactor", lambda s: 0.01, None).tx
    state = train_state.TrainState(
        step=jnp.asarray(7, jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )  # fmt: skip
    ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
    ckpt.save(7, state, {}, checkpoints.make_meta(TINY))
    ckpt.close()
    return model_dir, params


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, name) if isinstance(v, dict) else {name: np.asarray(v)})
    return out


def test_orbax_hf_orbax_round_trip_is_bit_exact(trained_style_checkpoint, tmp_path):
    model_dir, params = trained_style_checkpoint
    hf.orbax_to_hf(model_dir, str(tmp_path / "hf"), max_shard_bytes=20_000, tokenizer=False)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded
    hf.hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "back"), dtype="float32",
                   eval_capacity_factor=4.0)  # fmt: skip
    config, back = checkpoint_io.load_params(str(tmp_path / "back"))
    assert config.sparse_layers("encoder") == TINY.sparse_layers("encoder")
    assert config.sparse_layers("decoder") == TINY.sparse_layers("decoder")
    a, b = _flat(params), _flat(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_exported_model_loads_in_transformers_with_same_logits(trained_style_checkpoint, tmp_path):
    model_dir, params = trained_style_checkpoint
    hf.orbax_to_hf(model_dir, str(tmp_path / "hf"), tokenizer=False)
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        str(tmp_path / "hf")
    ).eval()
    enc, dec_in, targets = batch_for(TINY.vocab_size, seed=5)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec_in)).logits
    logits = network.EncoderDecoder(TINY).apply(
        {"params": params}, jnp.asarray(enc, jnp.int32), jnp.asarray(dec_in, jnp.int32),
        jnp.asarray(targets, jnp.int32), enable_dropout=False,
    )  # fmt: skip
    assert float(np.max(np.abs(np.asarray(logits) - ref.numpy()))) < TOLERANCE


def test_converted_checkpoint_restores_as_training_state(
    trained_style_checkpoint, tmp_path, mesh_222
):
    """train/fine-tuning restore it: the TrainState `setup_train_state` plans, fresh optimizer."""
    model_dir, params = trained_style_checkpoint
    hf.orbax_to_hf(model_dir, str(tmp_path / "hf"), tokenizer=False)
    hf.hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ckpt"), dtype="float32",
                   eval_capacity_factor=4.0)  # fmt: skip
    config = checkpoint_io.open_checkpoint(str(tmp_path / "ckpt")).config
    setup = train_state.setup_train_state(
        lambda rng: network.init_variables(config, rng),
        lambda specs: optim.make_optimizer("adafactor", lambda s: 0.01, specs),
        mesh_222,
        0,
    )
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    restored = ckpt.restore(setup.abstract_state, expected_meta=checkpoints.make_meta(config))
    ckpt.close()
    state = restored.state
    assert int(state.step) == 0
    a, b = _flat(jax.tree.map(np.asarray, state.params)), _flat(params)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in b)
    fresh = setup.optimizer.tx.init(state.params)
    assert checkpoints.tree_equal(state.opt_state, fresh)
    assert np.array_equal(np.asarray(state.rng), np.asarray(setup.init_fn().rng))


# ---------------------------------------------------------------------------------------------
# What HF cannot represent, and bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, feature",
    [
        (dict(mlp_activations=("gelu", "linear")), "gated"),
        (dict(router_type="topk", num_selected_experts=2), r"top-2 routing \(router_type"),
        (
            dict(router_type="experts_choose", decoder_router_type="switch"),
            r"expert-choice routing \(router_type='experts_choose'\)",
        ),
        (dict(encoder_sparse_layers=(0,)), "sparse layer layout"),
        (dict(moe_layer_interval=3, num_encoder_layers=6), "sparse layer layout"),
    ],
)
def test_export_refuses_what_hf_cannot_represent(change, feature):
    import dataclasses

    with pytest.raises(hf.UnsupportedFeatureError, match=feature):
        hf.hf_config_from_ours(dataclasses.replace(TINY, **change))


def test_import_rejects_separate_input_embeddings(tmp_path):
    model = make_hf_model(CONFIGS["e8_steps4and1_untied"])
    model.encoder.embed_tokens = torch.nn.Embedding(*model.shared.weight.shape)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(hf.UnsupportedFeatureError, match=r"encoder\.embed_tokens\.weight differs"):
        hf.load_hf(str(tmp_path))


def test_import_rejects_router_bias_and_mismatched_layout(tmp_path):
    kwargs = CONFIGS["e2_steps1and2"]
    make_hf_model(kwargs).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    # The weights have a router in decoder block 1 only; transformers reads the explicit step
    # (not num_sparse_decoder_layers) and would build routers in both blocks.
    cfg["decoder_sparse_step"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="decoder: the weights have routers in blocks"):
        hf.load_hf(str(tmp_path))
    cfg["router_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.UnsupportedFeatureError, match="router_bias"):
        hf.load_hf(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        hf.load_hf(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# transformers' routing rule where transformers really drops tokens.
# ---------------------------------------------------------------------------------------------

DROP_CONFIG = dict(
    vocab_size=300, d_model=9, d_kv=3, d_ff=16, num_heads=2, num_experts=4,
    num_layers=2, num_sparse_encoder_layers=2, num_decoder_layers=2,
    num_sparse_decoder_layers=1, expert_capacity=2,
)  # fmt: skip
DROP_LENGTHS = {"inputs": (16, 40, 27, 33), "targets": (16, 40, 22, 31)}


def _right_padded(rng, vocab, lengths):
    """<int64>[len(lengths), max(lengths)] random tokens (>= 2), each row right-padded with 0."""
    out = np.zeros((len(lengths), max(lengths)), np.int64)
    for row, n in enumerate(lengths):
        out[row, :n] = rng.integers(2, vocab, n)
    return out


def _hf_drops(model, enc, enc_mask, dec_in, dec_mask):
    """Real tokens each HF router dropped (its dispatch mask is all zero), per sparse layer."""
    router_cls = (
        transformers.models.switch_transformers.modeling_switch_transformers
    ).SwitchTransformersTop1Router
    masks = []

    def hook(module, _inputs, out):
        masks.append(out[0].sum(-1) == 0)  # [batch, length]: no expert took the token

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, router_cls)]
    with torch.no_grad():
        out = model(
            input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec_in,
            decoder_attention_mask=dec_mask,
        )  # fmt: skip
    for h in hooks:
        h.remove()
    n_enc = sum(b.is_sparse for b in model.encoder.block)
    real = [enc_mask] * n_enc + [dec_mask] * (len(masks) - n_enc)
    return out.logits.numpy(), [int((m & r.bool()).sum()) for m, r in zip(masks, real)]


@pytest.fixture(scope="module")
def dropping(tmp_path_factory):
    """A transformers model (expert_capacity 2, routers x8) and our default import of it."""
    model = make_hf_model(DROP_CONFIG, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router.classifier" in name:
                p.mul_(2.0)  # x8 in all: sharper still, so that experts overflow
    path = str(tmp_path_factory.mktemp("dropping"))
    model.save_pretrained(path)
    ours, params = hf.load_hf(path, dtype="float32")
    return model, ours, params


def test_import_follows_transformers_routing_where_it_drops(dropping):
    model, ours, params = dropping
    assert ours.config.expert_capacity == 2  # recorded from config.json
    rng = np.random.default_rng(7)
    vocab = DROP_CONFIG["vocab_size"]
    enc = _right_padded(rng, vocab, DROP_LENGTHS["inputs"])
    targets = _right_padded(rng, vocab, DROP_LENGTHS["targets"])
    dec_in = np.concatenate([np.zeros((len(targets), 1), np.int64), targets[:, :-1]], axis=1)
    enc_mask, dec_mask = enc != 0, targets != 0
    ref, dropped = _hf_drops(
        model, *(torch.tensor(a).long() for a in (enc, enc_mask, dec_in, dec_mask))
    )
    assert min(dropped) > 0, f"transformers must drop real tokens in every sparse layer: {dropped}"
    logits, state = ours.apply(
        {"params": params}, *(jnp.asarray(a, jnp.int32) for a in (enc, dec_in, targets)),
        enable_dropout=False, mutable=["intermediates"],
    )  # fmt: skip
    stats = moe.collect_moe_intermediates(state["intermediates"])
    assert float(stats["fraction_dropped"]) > 0.1
    # Real target positions (padded ones are masked out of every loss, in both models).
    diff = np.abs(np.asarray(logits)[..., :vocab] - ref)[dec_mask]
    print(f"max |logit difference| with drops = {diff.max():.2e}")
    assert diff.max() < TOLERANCE


def test_import_greedy_tokens_match_transformers_where_it_drops(dropping):
    model, ours, params = dropping
    vocab, length = DROP_CONFIG["vocab_size"], 12
    enc = _right_padded(np.random.default_rng(8), vocab, DROP_LENGTHS["inputs"])
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(enc), attention_mask=torch.tensor(enc != 0).long(),
            max_new_tokens=length, do_sample=False, num_beams=1, decoder_start_token_id=0,
            eos_token_id=1, pad_token_id=0,
        ).numpy()[:, 1:]  # fmt: skip
    ref = np.pad(ref, ((0, 0), (0, length - ref.shape[1])))
    # Padded vocabulary rows are not tokens of the transformers model.
    out = decoding.decode_batch(
        ours, {k: v for k, v in params.items()}, {"encoder_input_tokens": enc.astype(np.int32)},
        max_decode_length=length,
    )  # fmt: skip
    assert float(out.fraction_dropped) > 0.1
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_export_keeps_the_imported_expert_capacity(tmp_path):
    """hf -> orbax -> hf without --expert_capacity writes back the capacity the model uses."""
    model = make_hf_model(DROP_CONFIG, seed=0)
    model.save_pretrained(str(tmp_path / "hf"))
    hf.hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ckpt"), dtype="float32")
    hf.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), tokenizer=False)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["expert_capacity"] == DROP_CONFIG["expert_capacity"] == 2
    hf.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "b5"), tokenizer=False, expert_capacity=5)
    assert json.loads((tmp_path / "b5" / "config.json").read_text())["expert_capacity"] == 5


def _save_checkpoint(model_dir, config, params):
    tx = optim.make_optimizer("adafactor", lambda s: 0.01, None).tx
    state = train_state.TrainState(
        step=jnp.asarray(7, jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )  # fmt: skip
    ckpt = checkpoints.Checkpointer(str(model_dir), async_save=False)
    ckpt.save(7, state, {}, checkpoints.make_meta(config))
    ckpt.close()


def test_scanned_checkpoint_exports_and_imports_as_its_unscanned_twin(
    trained_style_checkpoint, tmp_path
):
    """Export of a `scan_layers=True` run failed with a bare KeyError on `layers_0` paths."""
    from switch_t5 import scan_utils

    model_dir, params = trained_style_checkpoint
    scanned = dataclasses.replace(TINY, scan_layers=True)
    _save_checkpoint(tmp_path / "scanned", scanned, scan_utils.scan_params(params, scanned))
    hf.orbax_to_hf(model_dir, str(tmp_path / "hf"), tokenizer=False)
    hf.orbax_to_hf(str(tmp_path / "scanned"), str(tmp_path / "hf_scan"), tokenizer=False)
    a, b = _safetensors(tmp_path / "hf"), _safetensors(tmp_path / "hf_scan")
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # The other direction: an import asked for scanned layers writes them stacked.
    hf.hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "back"), dtype="float32",
                   eval_capacity_factor=4.0, scan_layers=True)  # fmt: skip
    config, back = checkpoint_io.load_params(str(tmp_path / "back"))
    assert config.scan_layers and scan_utils.is_scanned(back)
    a, b = _flat(params), _flat(scan_utils.unscan_params(back, config))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
