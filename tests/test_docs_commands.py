"""The commands of README.md, docs/*.md and the gin files' comments run.

Marker scheme: `<!-- flow: NAME -->` marks the code right after it as the command(s) of the user
flow NAME: a fenced block when the marker stands on the line before the fence, else the first
inline code span after the marker (a row of the README's flow table, a command in prose). Each
marked command runs as a subprocess, on one CPU device, with tiny overrides appended (2 steps,
batch 2, short lengths), its `/tmp/...` paths moved under this test's temporary folder and the
docs' placeholder inputs (`/ckpt/switch_base_8`, `/data/RTE/*.tsv`, `inputs.txt`) replaced by a
run or files made here. One tiny pretraining run (the quick start) feeds the flows that read a
run: eval, infer, convert and fine-tuning.

Every other command (GLUE/C4 runs, pods, placeholders) is checked without running: its flags
parse with the command's own parser, the gin files it names exist, and its gin files and
`--gin.X` bindings parse (`gin_utils.parse_gin`, which refuses a macro no binding uses).
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import gin
import pytest

from switch_t5 import gin_utils

ROOT = gin_utils.REPO_ROOT
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
GIN_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.gin"), recursive=True))

# Flows that must have at least one marked command, in the order they depend on each other.
FLOWS = (
    "quickstart",
    "pretrain",
    "data_show",
    "plan",
    "eval",
    "convert",
    "finetune_tsv",
    "infer",
    "sweep",
    "distill",
)
PYTHON = r"python[0-9.]*"
_MARKER = re.compile(r"<!--\s*flow:\s*(\w+)\s*-->")

# The docs' placeholders, replaced before the generic `/tmp/` -> temporary folder rule. The
# quick-start run stands in for a pretrained checkpoint; infer's example run is the fine-tuned one.
SUBSTITUTIONS = (
    ("/ckpt/switch_base_8", "/tmp/switch_t5_quickstart"),
    ("/data/RTE/", ""),
    ("/tmp/glue", "/tmp/rte_tsv"),
)
TRAIN_OVERRIDES = (
    "--gin.TRAIN_STEPS=2",
    "--gin.BATCH_SIZE=2",
    # No teacher-forced eval, samples or plots during training: eval has its own flow.
    "--gin.EVAL_PERIOD=0",
    "--gin.CHECKPOINT_PERIOD=2",
    "--gin.LOG_EVERY=1",
    "--gin.train.num_samples=0",
    "--gin.train.make_plots=False",
)
# The gin files whose comment examples run here (the others need C4, GLUE or a full-size model).
RUNNABLE_GIN_EXAMPLES = (
    "configs/experiments/quickstart.gin",
    "configs/experiments/finetune_user_tsv.gin",
    "configs/runs/infer.gin",
)
FINETUNE_OVERRIDES = (
    # Decode-and-score at the end keeps MODEL_DIR/best, which the docs' later commands read.
    "--gin.INFER_EVAL_PERIOD=2",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
)
RTE_ROWS = [
    ("Ann is tall.", "Ann is short.", "not_entailment"),
    ("Bob runs to school.", "Bob moves.", "entailment"),
    ("A cat sat on the mat.", "A cat sat.", "entailment"),
    ("It rains all day.", "It is dry.", "not_entailment"),
]


# ---------------------------------------------------------------------------------------------
# Extraction.
# ---------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _code_after(text: str) -> str:
    """The fenced block starting on the next line, else the first inline code span."""
    stripped = text.lstrip(" ")
    if stripped.startswith("\n") and stripped.lstrip("\n").startswith("```"):
        body = stripped.lstrip("\n").split("\n", 1)[1]
        return body.split("\n```", 1)[0]
    span = re.search(r"`([^`]+)`", text)
    assert span, f"no code after a flow marker: {text[:80]!r}"
    return re.sub(r"\s*\n\s*", " ", span.group(1))


def marked_blocks() -> list[tuple[str, str, str]]:
    """(flow, where, code) for every marker of README.md and docs/*.md, in document order."""
    blocks = []
    for path in DOCS:
        text = _read(path)
        for m in _MARKER.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            blocks.append((m.group(1), where, _code_after(text[m.end() :])))
    return blocks


def _is_setup(argv: list[str]) -> bool:
    """`python3.11 -m venv .venv`, `. .venv/bin/activate`, `pip install -e .`: the test runs in
    the installed environment already."""
    return argv[0] in (".", "source", "pip") or argv[1:3] in (["-m", "venv"], ["-m", "pip"])


def commands(code: str) -> list[list[str]]:
    """The commands of a block: continuation lines joined, `#` comments dropped, `a && b`
    split, set-up steps left out, `python`/`python3.x` as this interpreter."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            argv, tokens = tokens[:cut], tokens[cut + 1 :]
            # `nice -n 10 /usr/bin/time -v python ...`: the command starts at python.
            start = next((i for i, t in enumerate(argv) if re.fullmatch(PYTHON, t)), None)
            if start is not None and not _is_setup(argv[start:]):
                out.append([sys.executable, *argv[start + 1 :]])
    return out


def _program(argv: list[str]) -> str:
    """`switch_t5.train` for `python -m switch_t5.train ...`, the script path otherwise."""
    return argv[2] if argv[1] == "-m" else argv[1]


def _gin_comment_commands(path: str) -> list[list[str]]:
    """The `python ...` commands written in a gin file's `#` comments."""
    lines = [line.lstrip("#").strip() for line in _read(path).splitlines() if line[:1] == "#"]
    text = "\n".join(lines).replace("\\\n", " ")
    return [
        cmd for line in text.splitlines() if line.startswith("python ") for cmd in commands(line)
    ]


def all_documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `python -m switch_t5.*` / `python scripts/*` command in the docs'
    fenced blocks and inline code, and in the gin files' comments."""
    found = []
    for path in DOCS:
        text = _read(path)
        text = re.sub(r"<!--.*?-->", "", text)
        spans = re.findall(r"```[^\n]*\n(.*?)\n```", text, re.S)
        rest = re.sub(r"```[^\n]*\n.*?\n```", "", text, flags=re.S)
        spans += [re.sub(r"\s*\n\s*", " ", s) for s in re.findall(r"`([^`]+)`", rest)]
        for code in spans:
            if not re.search(r"python[0-9.]* (-m switch_t5|scripts/)", code):
                continue
            for argv in commands(code):
                # A program named in prose (`python -m switch_t5.convert`, `... plan ...`).
                mention = argv[-1] in ("...", _program(argv))
                if re.match(r"switch_t5\.|scripts/", _program(argv)) and not mention:
                    found.append((os.path.relpath(path, ROOT), argv))
    for path in GIN_FILES:
        found += [(os.path.relpath(path, ROOT), argv) for argv in _gin_comment_commands(path)]
    return found


# ---------------------------------------------------------------------------------------------
# Every listed flow has a marked block; every command is well-formed.
# ---------------------------------------------------------------------------------------------


def test_every_flow_has_a_marked_command():
    flows = {flow for flow, _, _ in marked_blocks()}
    missing = [f for f in FLOWS if f not in flows]
    assert not missing, f"flows without a `<!-- flow: NAME -->` command in the docs: {missing}"
    unknown = flows - set(FLOWS)
    assert not unknown, f"markers name flows this test does not know (add to FLOWS): {unknown}"
    for flow, where, code in marked_blocks():
        assert commands(code), f"{where}: the {flow} marker is followed by no python command"


def _parse_command_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Parses argv with the command's own parser (argparse exits on an unknown flag); returns
    its gin files and bindings."""
    import importlib

    program, args = _program(argv), argv[3:] if argv[1] == "-m" else argv[2:]
    if program == "switch_t5.convert":
        from switch_t5 import convert

        ns = convert.build_parser().parse_args(args)
        files = getattr(ns, "gin_file", [])
        return files, [b.removeprefix("--gin.") for b in getattr(ns, "gin_bindings", [])]
    if program.startswith("switch_t5."):
        module = importlib.import_module(program)
        if not hasattr(module, "_add_arguments"):  # no gin flags (switch_t5.data.vocab)
            return [], []
        flags = gin_utils.parse_flags(args, module._add_arguments)
        bindings = flags.gin_bindings
        if program == "switch_t5.eval" and not flags.gin_files:
            bindings = module.default_bindings() + bindings
        return flags.gin_files, bindings
    # scripts/sweep_experts.py: the gin flags it passes on to every run.
    files = [a.split("=", 1)[1] for a in args if a.startswith("--gin_file=")]
    bindings = [a[len("--gin.") :].replace("=", " = ", 1) for a in args if a.startswith("--gin.")]
    return files, bindings


@pytest.mark.parametrize(
    "where, argv",
    all_documented_commands(),
    ids=lambda x: x if isinstance(x, str) else " ".join(x[1:4])[:60],
)
def test_documented_command_flags_and_gin_parse(where, argv):
    """Flags known to the command; shipped gin files exist; gin files and bindings parse, with
    no unused macro. Files a run writes (`/tmp/run/config.gin`) and a user's own are skipped."""
    files, bindings = _parse_command_flags(argv)
    shipped = [f for f in files if f.startswith("configs/")]
    shipped = [f for f in shipped if not re.search(r"\b[A-Z]{3,}\b", f)]  # configs/models/NAME.gin
    for f in shipped:
        assert os.path.exists(os.path.join(ROOT, f)), f"{where}: {f} does not exist"
    if len(shipped) < len(files):
        # A run's config.gin or a user's gin file is not here: drop the macros it would use.
        bindings = [b for b in bindings if not re.match(r"\s*[A-Z][A-Z0-9_]*\s*=", b)]
    gin.clear_config()
    try:
        gin_utils.parse_gin(shipped, bindings, finalize=len(shipped) == len(files))
    finally:
        gin.clear_config()


# ---------------------------------------------------------------------------------------------
# The marked flows run.
# ---------------------------------------------------------------------------------------------


class FlowRunner:
    """Runs the marked commands in `work` (with configs/ and scripts/ linked in, and the
    generated input files) with paths under `tmp`; records each command it ran."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.work = os.path.join(tmp, "work")
        os.makedirs(self.work)
        for name in ("configs", "scripts"):
            os.symlink(os.path.join(ROOT, name), os.path.join(self.work, name))
        header = "index\tsentence1\tsentence2\tlabel\n"
        rows = "".join(f"{i}\t{a}\t{b}\t{c}\n" for i, (a, b, c) in enumerate(RTE_ROWS))
        for name in ("train.tsv", "dev.tsv"):
            with open(os.path.join(self.work, name), "w") as f:
                f.write(header + rows)
        with open(os.path.join(self.work, "inputs.txt"), "w") as f:
            f.write("rte sentence1: Ann is tall. sentence2: Ann is short.\n\nBob runs.\n")
        cache = os.environ.get(
            "SWITCH_T5_TEST_COMPILATION_CACHE",
            os.path.join(os.path.expanduser("~"), ".cache", "switch_t5", "jax_test_cache"),
        )
        self.env = {
            **os.environ,
            "PYTHONPATH": ROOT,
            "JAX_PLATFORMS": "cpu",
            # One device, as on a laptop; see conftest.py for the optimisation level.
            "XLA_FLAGS": "--xla_backend_optimization_level=0",
            "JAX_COMPILATION_CACHE_DIR": cache,
        }
        self.ran: dict[str, subprocess.CompletedProcess] = {}
        self.seconds: dict[str, float] = {}

    def argv(self, argv: list[str]) -> list[str]:
        # argv[0] is this interpreter: its path may itself lie under /tmp (a clone there).
        text = shlex.join(argv[1:])
        for old, new in SUBSTITUTIONS:
            text = text.replace(old, new)
        argv = [argv[0], *shlex.split(text.replace("/tmp/", self.tmp + "/"))]
        program = _program(argv)
        if program == "switch_t5.train" or program.endswith("sweep_experts.py"):
            argv += TRAIN_OVERRIDES
            if not any(a.startswith("--gin.MODEL_DIR=") for a in argv):
                # quickstart.gin's MODEL_DIR.
                argv.append(f"--gin.MODEL_DIR='{self.tmp}/switch_t5_quickstart'")
            if any("finetune" in a for a in argv if a.startswith("--gin_file=")):
                argv += FINETUNE_OVERRIDES
        if program.endswith("sweep_experts.py"):
            argv = [a for a in argv if not a.startswith("--gin.MODEL_DIR=")]
            argv += ["--experts=2", "--no_dense"]
        if program == "switch_t5.eval":
            argv.append("--gin.switch_t5.evaluate.max_examples=8")
        if program == "switch_t5.infer":
            argv.append("--max_decode_length=8")
        return argv

    def run_flow(self, flow: str) -> list[subprocess.CompletedProcess]:
        blocks = [(where, code) for f, where, code in marked_blocks() if f == flow]
        results = []
        for where, code in blocks:
            for argv in commands(code):
                results.append(self.run(where, self.argv(argv)))
        return results

    def run_gin_examples(self, path: str) -> list[subprocess.CompletedProcess]:
        where = os.path.relpath(path, ROOT)
        return [self.run(where, self.argv(argv)) for argv in _gin_comment_commands(path)]

    def run(self, where: str, argv: list[str]) -> subprocess.CompletedProcess:
        key = shlex.join(argv)
        if key not in self.ran:  # the README's pretrain row is the quick start's command
            start = time.perf_counter()
            result = subprocess.run(
                argv, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=600
            )
            self.seconds[key] = time.perf_counter() - start
            assert result.returncode == 0, (
                f"{where}: `{key}` exited with {result.returncode}:\n{result.stderr[-3000:]}"
            )
            self.ran[key] = result
        return self.ran[key]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return FlowRunner(str(tmp_path_factory.mktemp("docs")))


@pytest.fixture(scope="module")
def pretrained(runner):
    """The quick start, shrunk: the run the later flows read."""
    runner.run_flow("quickstart")
    model_dir = os.path.join(runner.tmp, "switch_t5_quickstart")
    assert os.listdir(os.path.join(model_dir, "checkpoints")) == ["2"]
    return model_dir


@pytest.fixture(scope="module")
def finetuned(runner, pretrained):
    runner.run_flow("finetune_tsv")
    return os.path.join(runner.tmp, "rte_tsv")


@pytest.mark.slow
def test_quickstart_and_pretrain_rows(runner, pretrained):
    (result,) = runner.run_flow("pretrain")
    assert "Checkpoints:" in result.stdout + result.stderr
    assert os.path.exists(os.path.join(pretrained, "metrics.jsonl"))


@pytest.mark.slow
def test_data_show(runner):
    for result in runner.run_flow("data_show"):
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 3 and all(line.startswith('{"index"') for line in lines)


def test_plan(runner):
    (result,) = runner.run_flow("plan")
    assert "total_params: 1571" in result.stdout


@pytest.mark.slow
def test_eval(runner, pretrained):
    for result in runner.run_flow("eval"):
        assert "Main metric embedded_span_corruption/cross_entropy" in result.stdout


def test_convert(runner, pretrained):
    runner.run_flow("convert")
    hf_dir = os.path.join(runner.tmp, "quickstart_hf")
    assert {"config.json", "spiece.model"} <= set(os.listdir(hf_dir))


@pytest.mark.slow
def test_finetune_tsv(runner, finetuned):
    results = runner.run_flow("finetune_tsv")
    assert os.path.exists(os.path.join(finetuned, "best", "best.json"))
    # The finetuning page's block ends with eval of the best checkpoint.
    assert "Main metric files_text_to_text/accuracy" in results[-1].stdout


@pytest.mark.slow
def test_infer(runner, pretrained, finetuned):
    results = runner.run_flow("infer")
    assert len(results) >= 3
    with open(os.path.join(runner.work, "outputs.jsonl")) as f:
        assert len(f.read().splitlines()) == 3  # one per input line, the blank one included


@pytest.mark.slow
def test_sweep(runner):
    result = runner.run_flow("sweep")[-1]  # README and training.md: the same command
    assert os.path.exists(os.path.join(runner.tmp, "sweep", "comparison.md")), result.stdout


@pytest.mark.slow
def test_distill(runner, pretrained):
    """The quick start's run is the teacher of its dense twin."""
    runner.run_flow("distill")
    with open(os.path.join(runner.tmp, "distilled", "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r.get("split") == "train"]
    assert train and "distillation_cross_entropy" in train[-1], train[-1:]


@pytest.mark.slow
def test_gin_comment_examples(runner, finetuned):
    """The quick start's and fine-tuning's are the docs' commands (already run); then eval of the
    best checkpoint with the run's config.gin and runs/eval.gin, and beam search with infer.gin."""
    results = []
    for path in RUNNABLE_GIN_EXAMPLES:
        results += runner.run_gin_examples(os.path.join(ROOT, path))
    assert "Main metric files_text_to_text/accuracy" in results[-2].stdout
    assert len(results[-1].stdout.splitlines()) == 3  # inputs.txt: one output per line
