"""Every shipped model config parses and initialises abstractly; parameter counts."""

import glob
import os
import subprocess
import sys

import gin
import pytest

from switch_t5 import errors, gin_utils, network, plan

MODELS_DIR = os.path.join(gin_utils.CONFIGS_DIR, "models")
MODEL_CONFIGS = sorted(
    os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(MODELS_DIR, "*.gin"))
)

# Exact counts (vocab 32128): T5-Base, and Switch-Base-8 = T5-Base + 12 sparse layers of
# 7 extra experts (2 * 768 * 3072 each) and a 768 x 8 router.
EXACT = {
    "t5_base": (222_903_552, 222_903_552),
    "switch_base_8": (619_339_008, 222_977_280),
}
# Published sizes (arXiv 2101.03961 Tables 1 and 9; HF model cards), within 0.5%.
PUBLISHED = {
    "switch_base_128": 7.415e9,
    "switch_large_128": 26.31e9,
    "switch_xxl_128": 394.7e9,
    "switch_c_2048": 1571.3e9,
    # ST-MoE (arXiv 2202.08906 Table 10).
    "st_moe_32b": 269e9,
}


def _config(name: str, bindings: tuple[str, ...] = ()):
    gin.clear_config()
    try:
        gin_utils.parse_gin([f"configs/models/{name}.gin"], bindings)
        return gin_utils.make_model_config()
    finally:
        gin.clear_config()


def test_all_expected_configs_ship():
    expected = {f"switch_base_{e}" for e in (8, 16, 32, 64, 128, 256)}
    expected |= {"switch_large_128", "switch_xxl_128", "switch_c_2048", "t5_base", "tiny"}
    expected |= {"st_moe_base", "st_moe_32b"}
    assert set(MODEL_CONFIGS) == expected


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_parses_and_initialises_abstractly(name):
    config = _config(name)
    model_plan = plan.plan_model(config)
    assert model_plan.total_params >= model_plan.active_params_per_token > 0
    assert config.vocab_size == 32128
    if name in EXACT:
        assert (model_plan.total_params, model_plan.active_params_per_token) == EXACT[name]
    if name in PUBLISHED:
        assert abs(model_plan.total_params / PUBLISHED[name] - 1) < 0.005, model_plan
    if name.startswith("switch_base_"):
        experts = int(name.rsplit("_", 1)[1])
        assert config.num_experts == experts
        # T5-Base plus, in 12 sparse layers, E - 1 extra experts and a [768, E] router.
        extra = 12 * ((experts - 1) * 2 * 768 * 3072 + 768 * experts)
        assert model_plan.total_params == EXACT["t5_base"][0] + extra
        assert model_plan.active_params_per_token == EXACT["t5_base"][0] + 12 * 768 * experts


def test_num_experts_macro_sweeps():
    config = _config("switch_base_8", ("NUM_EXPERTS = 64",))
    assert config.num_experts == 64
    params = network.init_abstract(config)["params"]
    kernel = params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"].value
    assert kernel.shape == (64, 768, 3072)


def test_plan_main_prints_counts(capsys):
    gin.clear_config()
    try:
        plan.main(["--gin_file=configs/models/t5_base.gin"])
    finally:
        gin.clear_config()
    out = capsys.readouterr().out.splitlines()
    assert "total_params: 222903552" in out
    assert "active_params_per_token: 222903552" in out


def test_plan_main_requires_a_gin_file():
    with pytest.raises(errors.UserError, match="--gin_file"):
        plan.main([])


def test_plan_runs_as_a_module_without_tensorflow():
    code = (
        "import sys; from switch_t5 import plan; "
        "plan.main(['--gin_file=configs/models/switch_base_8.gin', '--gin.NUM_EXPERTS=16']); "
        "assert 'tensorflow' not in sys.modules, 'plan imported TensorFlow'"
    )
    env = {**os.environ, "PYTHONPATH": gin_utils.REPO_ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=gin_utils.REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "total_params: 1072397568" in result.stdout.splitlines()


@pytest.mark.parametrize(
    "name, experts, z_loss", [("st_moe_base", 16, 1e-4), ("st_moe_32b", 64, 1e-3)]
)
def test_st_moe_configs(name, experts, z_loss):
    """Top-2, every 4th layer sparse with an extra dense MLP, gated GELU, router z-loss."""
    config = _config(name)
    assert (config.num_experts, config.num_selected_experts) == (experts, 2)
    assert config.router_z_loss_weight == z_loss
    assert config.mlp_activations == ("gelu", "linear")
    n = config.num_encoder_layers
    assert config.sparse_layers("encoder") == tuple(range(3, n, 4))
    assert config.sparse_layers("decoder") == tuple(range(3, n, 4))
    params = network.init_abstract(config)["params"]
    sparse_layer = (
        params["encoder"]["layers"]["subblock_3"]
        if config.scan_layers
        else params["encoder"]["layers_3"]
    )
    assert {"pre_extra_mlp_layer_norm", "extra_mlp", "mlp"} <= set(sparse_layer)
    assert "expert" in sparse_layer["mlp"]
    # Active params: everything but the experts, plus 2 of E experts in each sparse layer.
    model_plan = plan.plan_model(config)
    per_expert = model_plan.expert_params // experts
    assert model_plan.active_params_per_token == (
        model_plan.total_params - model_plan.expert_params + 2 * per_expert
    )


# ---------------------------------------------------------------------------------------------
# Experts without a sparse layer.
# ---------------------------------------------------------------------------------------------


def test_experts_without_a_sparse_layer_are_an_error():
    """moe_layer_interval=4 on 2-layer stacks makes no layer sparse: once trained as a dense
    model that logged "(8 experts)" and drops/losses of exactly 0."""
    from switch_t5.config import InvalidConfigError, SwitchConfig
    from switch_t5.errors import UserError

    two = dict(num_encoder_layers=2, num_decoder_layers=2, num_experts=8)
    with pytest.raises(InvalidConfigError) as e:
        SwitchConfig(**two, moe_layer_interval=4)
    text = str(e.value)
    assert isinstance(e.value, UserError)
    assert "num_experts=8 but no layer is sparse: 2 encoder and 2 decoder layers" in text
    assert "moe_layer_interval=4 (layer i sparse when i % 4 == 3)" in text
    assert "num_experts=0 for a dense model" in text and "moe_layer_interval of at most 2" in text
    # Explicit sets are named; other problems are listed in the same message.
    with pytest.raises(InvalidConfigError) as e:
        SwitchConfig(**two, encoder_sparse_layers=(), decoder_sparse_layers=(), d_model=0)
    text = str(e.value)
    assert "encoder_sparse_layers=(); decoder_sparse_layers=()" in text
    assert "d_model=0 must be positive" in text
    # One sparse stack is enough; a dense model may keep any interval.
    assert SwitchConfig(**two, moe_layer_interval=2, decoder_sparse_layers=()).is_sparse
    assert not SwitchConfig(**{**two, "num_experts": 0}, moe_layer_interval=4).is_sparse
    assert _config("t5_base").num_experts == 0


def test_hf_import_with_experts_keeps_its_sparse_layers():
    """HF's rule makes block 1 sparse even with num_sparse_*_layers=0 (sparse_step = num_layers):
    such a config imports as before, with its sparse layers."""
    from switch_t5.interop import hf

    config_json = dict(
        vocab_size=100,
        d_model=8,
        num_heads=2,
        d_kv=3,
        d_ff=16,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=0,
        num_sparse_decoder_layers=0,
        num_experts=4,
    )
    names = [
        f"{stack}.block.1.layer.{i}.mlp.router.classifier.weight"
        for stack, i in (("encoder", 1), ("decoder", 2))
    ]
    config = hf.config_from_hf(config_json, names)
    assert config.sparse_layers("encoder") == (1,) and config.sparse_layers("decoder") == (1,)
