"""Every shipped model config parses and initialises abstractly; parameter counts."""

import dataclasses
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


# ---------------------------------------------------------------------------------------------
# Every shipped gin file parses, finalizes and builds its model; run and experiment gins state
# only deliberate choices.
# ---------------------------------------------------------------------------------------------

RUNS = sorted(glob.glob(os.path.join(gin_utils.CONFIGS_DIR, "runs", "*.gin")))
EXPERIMENTS = sorted(glob.glob(os.path.join(gin_utils.CONFIGS_DIR, "experiments", "*.gin")))
# The macros each run/experiment gin leaves required, set as its comment's example command does.
REQUIRED_BINDINGS = {
    "runs/pretrain.gin": ("MODEL_DIR = '/tmp/run'",),
    "runs/finetune.gin": (
        "MODEL_DIR = '/tmp/rte'",
        "INITIAL_CHECKPOINT_PATH = '/tmp/switch_base_8'",
        "MIXTURE_OR_TASK_NAME = 'glue_rte_v002'",
        "TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 8}",
        "TRAIN_STEPS = 10000",
    ),
    "runs/eval.gin": ("MODEL_DIR = '/tmp/rte'", "MIXTURE_OR_TASK_NAME = 'glue_rte_v002'"),
    "runs/infer.gin": (),
    "experiments/quickstart.gin": (),
    "experiments/distill_quickstart.gin": (
        "TEACHER_CHECKPOINT_PATH = '/tmp/switch_t5_quickstart'",
    ),
    "experiments/finetune_glue.gin": ("MODEL_DIR = '/tmp/glue'", "INITIAL_CHECKPOINT_PATH = '/c'"),
    "experiments/finetune_superglue.gin": (
        "MODEL_DIR = '/tmp/superglue'",
        "INITIAL_CHECKPOINT_PATH = '/c'",
    ),
    "experiments/mswitch_base.gin": ("MODEL_DIR = '/tmp/mswitch'",),
    "experiments/finetune_user_tsv.gin": (
        "MODEL_DIR = '/tmp/rte_tsv'",
        "INITIAL_CHECKPOINT_PATH = '/c'",
        "TRAIN_FILES = 'train.tsv'",
        "VALIDATION_FILES = 'dev.tsv'",
    ),
}
# Run gins follow a model gin, as the docs' commands do (eval and infer read the checkpoint's).
RUN_MODELS = {"pretrain.gin": ("switch_base_8", "tiny"), "finetune.gin": ("switch_base_8",)}


def _rel(path: str) -> str:
    return os.path.relpath(path, gin_utils.CONFIGS_DIR)


def _gin_combinations() -> list[tuple[str, ...]]:
    combos = [(f"configs/{_rel(f)}",) for f in EXPERIMENTS]
    for f in RUNS:
        name = os.path.basename(f)
        models = RUN_MODELS.get(name, (None,))
        combos += [
            ((f"configs/models/{m}.gin",) if m else ()) + (f"configs/{_rel(f)}",) for m in models
        ]
    return combos


def test_every_run_and_experiment_gin_is_covered():
    assert {_rel(f) for f in RUNS + EXPERIMENTS} == set(REQUIRED_BINDINGS)
    assert {f[-1] for f in _gin_combinations()} == {
        f"configs/{_rel(f)}" for f in RUNS + EXPERIMENTS
    }


@pytest.mark.parametrize("files", _gin_combinations(), ids=lambda f: "+".join(map(_rel, f)))
def test_run_and_experiment_gins_parse_finalize_and_build(files):
    """Parsed with parse_gin (unused macros refused), finalized (no required macro left), the
    model config built and initialised abstractly."""
    gin.clear_config()
    try:
        gin_utils.parse_gin(files, REQUIRED_BINDINGS[_rel(files[-1])])
        config = gin_utils.make_model_config()
        model_plan = plan.plan_model(config)
    finally:
        gin.clear_config()
    assert model_plan.total_params >= model_plan.active_params_per_token > 0


def _defaults() -> dict[str, dict]:
    """Signature defaults of the configurables a run or experiment gin binds, read at test time
    (train()'s signature is the one home of its defaults)."""
    import inspect

    from switch_t5 import checkpoints, config, infer, train
    from switch_t5 import eval as eval_lib

    def params(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    switch = {f.name: f.default for f in dataclasses.fields(config.SwitchConfig)}
    return {
        "train": params(train.train),
        "evaluate": params(eval_lib.run_eval),
        "infer": params(infer.infer),
        # Model gins keep the architecture explicit (T5X): only runtime fields are checked.
        "SwitchConfig": {k: v for k, v in switch.items() if k in checkpoints.RUNTIME_FIELDS},
    }


class _Values(gin.config_parser.ParserDelegate):
    """Parses values as they are written: `%NAME` -> ("%", NAME), `@x` -> ("@", x)."""

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return ("@", scoped_configurable_name)

    def macro(self, macro_name):
        return ("%", macro_name)


def _statements(path: str) -> list:
    """The binding statements of a gin file and of the files it includes, includes first."""
    out = []
    with open(path) as f:
        for st in gin.config_parser.ConfigParser(f, _Values()):
            if isinstance(st, gin.config_parser.IncludeStatement):
                out += _statements(os.path.join(gin_utils.REPO_ROOT, st.filename))
            elif isinstance(st, gin.config_parser.BindingStatement):
                out.append((path, st))
    return out


def _is_deliberate(lines: list[str], line_num: int) -> bool:
    """Whether the comment block heading the statement's group (the statements right below one
    comment block, up to a blank line or the next comment) holds `deliberate:`."""
    i = line_num - 2
    while i >= 0 and lines[i].strip() and not lines[i].startswith("#"):
        i -= 1
    while i >= 0 and lines[i].startswith("#"):
        if "deliberate:" in lines[i]:
            return True
        i -= 1
    return False


def _same(a, b) -> bool:
    """Equal values of the same type (1 and 1.0 count as equal; True and 1 do not)."""
    return a == b and (type(a) is type(b) or {type(a), type(b)} <= {int, float})


def restated_defaults(path: str) -> list[str]:
    """`file:line binding` for each binding of the file (a literal, or a macro wired to the
    parameter) equal to the configurable's default without a `# deliberate:` comment."""
    defaults = _defaults()
    statements = _statements(path)
    wired: dict[str, list[tuple[str, str]]] = {}  # macro -> [(configurable, param)]
    for _, st in statements:
        if st.arg_name and isinstance(st.value, tuple) and st.value[:1] == ("%",):
            wired.setdefault(st.value[1], []).append((st.selector.split(".")[-1], st.arg_name))
    with open(path) as f:
        lines = f.read().splitlines()
    found = []
    for where, st in statements:
        if where != path or (isinstance(st.value, tuple) and st.value[:1] in (("%",), ("@",))):
            continue
        targets = [(st.selector.split(".")[-1], st.arg_name)] if st.arg_name else []
        for configurable, param in targets or wired.get(st.selector, []):
            default = defaults.get(configurable, {}).get(param, object())
            if _same(st.value, default) and not _is_deliberate(lines, st.location.line_num):
                line = st.location.line_content.strip()
                found.append(f"{_rel(path)}:{st.location.line_num} {line}")
    return found


@pytest.mark.parametrize("path", RUNS + EXPERIMENTS, ids=_rel)
def test_run_and_experiment_gins_restate_no_default(path):
    """A default stated again in a gin file hides which settings a run chose; a deliberate one
    (a macro users override, a value the file's recipe depends on) says so in a comment."""
    found = restated_defaults(path)
    assert not found, (
        "bindings equal to the Python default (drop them, or say why above them with a "
        "`# deliberate: ...` comment):\n" + "\n".join(found)
    )


def test_a_restated_default_is_caught(tmp_path):
    gin_file = tmp_path / "run.gin"
    gin_file.write_text(
        "include 'configs/runs/pretrain.gin'\n"
        "train.optimizer = 'adafactor'\n"
        "# deliberate: the schedule of this recipe.\n"
        "train.lr_schedule = 'rsqrt'\n"
        "\n"
        "LOG_EVERY = 100\n"
        "switch_t5.SwitchConfig.dropout_rate = 0.1\n"
        "switch_t5.SwitchConfig.d_model = 768\n"
    )
    found = [line.split(" ", 1)[1] for line in restated_defaults(str(gin_file))]
    assert found == [
        "train.optimizer = 'adafactor'",
        "LOG_EVERY = 100",
        "switch_t5.SwitchConfig.dropout_rate = 0.1",
    ]


def test_eval_gin_leaves_the_lengths_to_the_checkpoint():
    """eval.gin once set TASK_FEATURE_LENGTHS to 512/62 over what the run records: the quick
    start's run (64/16) could not be evaluated with it (`error: ... span corruption of 512-token
    inputs ... makes targets of 114 tokens`), and a run's config.gin lost its lengths."""
    gin.clear_config()
    try:
        gin_utils.parse_gin(
            ["configs/experiments/quickstart.gin", "configs/runs/eval.gin"],
            ["MODEL_DIR = '/tmp/m'", "MIXTURE_OR_TASK_NAME = 'embedded_span_corruption'"],
        )
        assert gin.query_parameter("TASK_FEATURE_LENGTHS/macro.value") is None
    finally:
        gin.clear_config()
