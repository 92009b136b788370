"""Switch vs dense quality at equal compute: eval loss vs step, and the steps-to-quality speedup.

    PYTHONPATH=. python scripts/bench_quality.py --quick        # at most ~10 min on 2 CPU cores
                                                                # with --variants=none
    PYTHONPATH=. python scripts/bench_quality.py --out=/tmp/q   # longer runs, bigger model

The paper's headline in miniature (arXiv 2101.03961 Figure 5: Switch-Base 64e reaches T5-Base's
quality 7x sooner). Three tiny encoder-decoders with the same d_model, d_ff, heads and layers:
the dense model and Switch models with 8 and 32 experts (every other feed-forward layer, top-1,
so the FLOPs per token match the dense model's up to the router), trained on the same batches of
span-corrupted text with Adafactor and T5's rsqrt schedule (`switch_t5.trainer.train_step`, the
real loss with the load-balancing term).

Data: the real C4 sample in ../shared/data/c4 when present, else the embedded corpus
(`embedded_span_corruption`). C4 documents are split by a hash into train and held-out files, a
SentencePiece vocabulary is trained on the train part, and the project's pipeline
(`InputPipeline`, packed span corruption) makes one pass over each; that step runs once in a
separate process (TensorFlow/seqio) and is cached as numpy arrays under --out, so training never
imports TensorFlow. The token budget (steps x batch) stays under one epoch of the train part:
every batch is new text. Eval is the token-level cross-entropy on all held-out batches.

Learning rate: the dense model's best of a small sweep (the final eval loss, mean over seeds), then
used for every model. Every (learning rate, seed) of one architecture trains at once as a `vmap`
population (same batches, own init and dropout/jitter rngs), so a model compiles once.

Output under --out: quality.json (curves and routing statistics), quality.png (eval loss vs step,
mean over seeds with the seeds' range). The steps a Switch model needs to reach the dense model's
final eval loss come from the seed-mean curves, smoothed by a 3-point moving average and
interpolated linearly between evals; the speedup is dense steps / those steps. The last line is
`steps_speedup_32e: X.X` (0.0 when the 32-expert model never reaches it), after the same line
for 8 experts. Also printed: the speedup per seed pair (dense seed i vs Switch seed i: the
run-to-run spread) and the speedup for every shorter budget T (the rsqrt schedule does not depend
on the total step count, so one run holds them all), the fraction of tokens dropped in training
and eval, the router's confidence and the busiest expert's share.

Experiments (README, bench_quality) use the flags: `--switch KEY=VALUE` changes a SwitchConfig
field of the Switch models only (capacity factors, groups, router losses and init, MoE layout,
dispatch), `--model KEY=VALUE` a size of every model, `--batch/--steps/--vocab` the budget,
`--switch_lrs` adds Switch learning rates as an extra figure, `--dense_variant KEY=VALUE` trains
an extra dense model (e.g. d_ff=2048: do more feed-forward parameters help at this budget at
all?), and `--reuse` loads populations already trained under identical settings from --out.

Routing variants (`--variants`, all by default; `none` to skip): each is one row against the
8-expert Switch model at the same steps, learning rate (the dense best) and seeds: expert choice
in the encoder (decoder top-1), bias balancing with the load-balancing loss off (skipped with a
note where SwitchConfig has no `router_bias_update_rate`), and 1 shared + 32 fine-grained experts
of d_ff/4 with k=3 (`variant_fields`). The table gives the final eval cross-entropy (mean +- half
range over seeds), the steps-speedup over the Switch model, the busiest expert's load over the
mean, and the drop fractions (`variant_row`). The rows add three Switch-sized populations: with
them (and --experts=8) --quick took 27 min on 2 CPU cores shared with other work (load ~10).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C4_SAMPLE = os.path.join(
    os.path.dirname(REPO), "shared", "data", "c4", "c4-sample.00000-of-00001.json.gz"
)

# name -> SwitchConfig fields shared by the three models, batch, steps, eval every, lengths.
SETTINGS: dict[str, dict[str, Any]] = {
    "quick": dict(
        model=dict(
            d_model=64,
            num_heads=4,
            head_dim=16,
            d_ff=256,
            num_encoder_layers=2,
            num_decoder_layers=2,
        ),
        batch=16,
        steps=150,
        eval_every=15,
        warmup=20,
        inputs=64,
        targets=14,
        vocab=2048,
        lrs=(0.1, 0.3, 1.0),
        seeds=2,
    ),
    # Twice the width and depth, 89% of the epoch (the C4 sample holds 610 batches of 16 x 78
    # slots at this vocabulary; longer sequences or bigger batches would exceed one epoch).
    "full": dict(
        model=dict(
            d_model=128,
            num_heads=4,
            head_dim=32,
            d_ff=512,
            num_encoder_layers=4,
            num_decoder_layers=4,
        ),
        batch=16,
        steps=540,
        eval_every=30,
        warmup=50,
        inputs=64,
        targets=14,
        vocab=2048,
        lrs=(0.1, 0.3, 1.0),
        seeds=3,
    ),
}


# ---------------------------------------------------------------------------------------------
# Data (separate process: TensorFlow + seqio).
# ---------------------------------------------------------------------------------------------


def _is_heldout(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def prepare_data(out: str, s: dict[str, Any], source: str, heldout_fraction: float) -> None:
    """Writes OUT/data.npz (train and eval batches) and OUT/data.json (what they are)."""
    import numpy as np

    from switch_t5 import data_gin, gin_utils
    from switch_t5.data import pipeline
    from switch_t5.data import vocab as vocab_lib
    from switch_t5.trainer import MODEL_FEATURES

    lengths = {"inputs": s["inputs"], "targets": s["targets"]}
    bindings = []
    if source == "c4":
        with gzip.open(C4_SAMPLE, "rt", encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f if line.strip()]
        parts = {"train": [], "validation": []}
        for d in docs:
            parts["validation" if _is_heldout(d, heldout_fraction) else "train"].append(d)
        paths = {}
        for split, texts in parts.items():
            paths[split] = os.path.join(out, f"c4_{split}.jsonl")
            with open(paths[split], "w", encoding="utf-8") as f:
                for t in texts:
                    f.write(json.dumps({"text": t}) + "\n")
        spm = os.path.join(out, f"c4_train_{s['vocab']}.model")
        if not os.path.exists(spm):
            vocab_lib.train_sentencepiece(parts["train"], spm, vocab_size=s["vocab"])
        task = "text_files_span_corruption"
        bindings += [
            f"MIXTURE_OR_TASK_NAME = '{task}'",
            f"TEXT_FILES = '{paths['train']}'",
            f"VALIDATION_FILES = '{paths['validation']}'",
            f"VOCABULARY_PATH = '{spm}'",
        ]
        doc_counts = {k: len(v) for k, v in parts.items()}
    else:
        task = "embedded_span_corruption"
        bindings += [f"MIXTURE_OR_TASK_NAME = '{task}'"]
        doc_counts = None
    gin_utils.parse_gin([], bindings)
    data_gin.register_tasks(
        task, cache_dir=os.path.join(out, "cache"), embedded_vocab_size=s["vocab"]
    )
    vocab_size = data_gin.get_vocabulary(task).vocab_size

    def one_pass(split: str, shuffle: bool) -> dict[str, np.ndarray]:
        p = pipeline.InputPipeline(
            task,
            split,
            lengths,
            s["batch"],
            seed=0,
            shuffle=shuffle,
            pack=True,
            repeat=False,
            host_index=0,
            num_hosts=1,
        )
        batches = list(p)
        return {k: np.stack([b[k] for b in batches]) for k in MODEL_FEATURES}

    train = one_pass("train", True)
    evals = one_pass("validation", False)
    np.savez_compressed(
        os.path.join(out, "data.npz"),
        **{f"train/{k}": v for k, v in train.items()},
        **{f"eval/{k}": v for k, v in evals.items()},
    )
    meta = {
        "source": source,
        "task": task,
        "vocab_size": vocab_size,
        "documents": doc_counts,
        "train_batches": int(train["encoder_input_tokens"].shape[0]),
        "eval_batches": int(evals["encoder_input_tokens"].shape[0]),
        "eval_target_tokens": int((evals["decoder_target_tokens"] > 0).sum()),
        "batch": s["batch"],
        "lengths": lengths,
        "heldout_fraction": heldout_fraction,
        "vocab": s["vocab"],
    }
    with open(os.path.join(out, "data.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _data(out: str, s: dict[str, Any], source: str, heldout_fraction: float, setting: str):
    meta_path = os.path.join(out, "data.json")
    key = {"source": source, "batch": s["batch"], "heldout_fraction": heldout_fraction}
    key["vocab"] = s["vocab"]
    key["lengths"] = {"inputs": s["inputs"], "targets": s["targets"]}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if all(meta.get(k) == v for k, v in key.items()):
            return meta
    cmd = [sys.executable, os.path.abspath(__file__), f"--out={out}", "--prepare_only"]
    cmd += [f"--setting={setting}", f"--source={source}", f"--heldout={heldout_fraction}"]
    cmd += [f"--batch={s['batch']}", f"--vocab={s['vocab']}"]
    env = dict(os.environ, PYTHONPATH=REPO)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(
            f"data preparation failed (exit {done.returncode}); rerun with --prepare_only to "
            f"see it alone:\n{done.stderr[-3000:]}"
        )
    print(f"prepared the data in {time.perf_counter() - t0:.0f} s (cached in {out})")
    with open(meta_path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Training populations (no TensorFlow).
# ---------------------------------------------------------------------------------------------


def _population(config, lrs, seeds, warmup, train, evals, steps, eval_every, label):
    """Trains one architecture for every (lr, seed) at once; returns curves and statistics."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from switch_t5 import network, optim, partitioning, trainer
    from switch_t5.train_state import BIAS_FIELD as BIAS_COLLECTION
    from switch_t5.train_state import TrainState

    module = network.EncoderDecoder(config)
    # T5X's output z-loss; every router weight the model's (LossConfig.for_model).
    loss_config = trainer.LossConfig(z_loss=1e-4).for_model(config)
    members = [(lr, seed) for lr in lrs for seed in range(seeds)]
    lr_arr = jnp.asarray([lr for lr, _ in members], jnp.float32)
    specs = nn.get_partition_spec(network.init_abstract(config)["params"])

    def make_opt(base_lr):
        # T5's rsqrt schedule (arXiv 1910.10683 sec. 3.1.2) with a short warm-up; the base is a
        # traced per-member value so that a learning-rate sweep is one vmapped program.
        return optim.make_optimizer("adafactor", optim.rsqrt_schedule(base_lr, warmup), specs)

    def init(seed):
        key = jax.random.key(seed)
        init_key, train_key = jax.random.split(key)
        variables = network.init_variables(config, init_key)
        params = nn.unbox(variables["params"])
        opt_state = make_opt(1.0).tx.init(params)
        # The choice biases of auxiliary-loss-free balancing (None without them): the trainer's
        # step moves them, and eval routes with them.
        router_bias = nn.unbox(variables.get(BIAS_COLLECTION))
        return TrainState(jnp.zeros([], jnp.int32), params, opt_state, train_key, router_bias)

    states = [init(1000 * seed + 17) for _, seed in members]
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(states[0].params))

    def step(state, batch, base_lr):
        return trainer.train_step(
            state, batch, module=module, optimizer=make_opt(base_lr), loss_config=loss_config
        )

    def evaluate(params, batch, router_bias):
        return trainer.eval_step(params, batch, router_bias, module=module, loss_config=loss_config)

    with partitioning.axis_rules():
        train_fn = jax.jit(jax.vmap(step, in_axes=(0, None, 0)), donate_argnums=0)
        eval_fn = jax.jit(jax.vmap(evaluate, in_axes=(0, None, 0)))

    def eval_loss(state):
        """Per member: held-out token cross-entropy, and the fraction of tokens dropped."""
        ce, w, dropped = 0.0, 0.0, 0.0
        n = evals["encoder_input_tokens"].shape[0]
        for i in range(n):
            with partitioning.axis_rules():
                batch = {k: v[i] for k, v in evals.items()}
                out = eval_fn(state.params, batch, state.router_bias)
            out = jax.device_get(out)
            ce, w = ce + out["cross_entropy_sum"], w + out["weight_sum"]
            dropped = dropped + np.asarray(out["fraction_dropped"]) / n
        return (ce / np.maximum(w, 1.0)).tolist(), np.broadcast_to(dropped, w.shape).tolist()

    curve_steps, curves, train_stats = [], [], []
    t0 = time.perf_counter()
    t_eval = 0.0
    for i in range(steps):
        with partitioning.axis_rules():
            state, metrics = train_fn(state, {k: v[i] for k, v in train.items()}, lr_arr)
        if i == 0:
            jax.block_until_ready(metrics)
            t_first = time.perf_counter() - t0
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            m = jax.device_get(metrics)
            curve_steps.append(i + 1)
            t1 = time.perf_counter()
            loss, eval_dropped = eval_loss(state)
            curves.append(loss)
            t_eval += time.perf_counter() - t1
            usage = np.asarray(m.get("expert_usage", np.zeros((0,))))
            processed = np.asarray(m.get("tokens_per_expert", np.zeros((0,))))
            train_stats.append(
                {
                    "step": i + 1,
                    "train_loss": np.asarray(m["cross_entropy"]).tolist(),
                    "fraction_dropped": np.asarray(m["fraction_dropped"]).tolist(),
                    "eval_fraction_dropped": eval_dropped,
                    "load_balancing_loss": np.asarray(m["load_balancing_loss"]).tolist(),
                    "router_confidence": np.asarray(m["router_confidence"]).tolist(),
                    # Collapse check: the busiest expert's share over a uniform share (1 = even).
                    "max_expert_share": (
                        (usage.max(axis=-1).mean(axis=-1) * config.num_experts).tolist()
                        if usage.size
                        else None
                    ),
                    # Per MoE layer (encoder first), the busiest expert's processed tokens (after
                    # capacity) over the mean (expert-choice layers report no pre-capacity usage).
                    "processed_share_by_layer": (
                        (processed.max(-1) / np.maximum(processed.mean(-1), 1e-9)).tolist()
                        if processed.size
                        else None
                    ),
                }
            )
    seconds = time.perf_counter() - t0
    curves_np = np.asarray(curves)  # [evals, members]
    print(
        f"{label:>10}: {n_params:>10,} params, {len(members)} members (lr x seed) trained "
        f"{steps} steps in {seconds:.0f} s (first step with compilation {t_first:.0f} s, evals "
        f"{t_eval:.0f} s); "
        "final eval loss "
        + ", ".join(
            f"lr {lr:g}/s{seed}: {curves_np[-1, j]:.3f}" for j, (lr, seed) in enumerate(members)
        ),
        flush=True,
    )
    return {
        "label": label,
        "num_experts": config.num_experts,
        "encoder_moe_layers": len(config.sparse_layers("encoder")),
        "params": n_params,
        "members": members,
        "steps": curve_steps,
        "eval_loss": curves_np.tolist(),
        "train_stats": train_stats,
        "seconds": seconds,
    }


def _smooth(y):
    import numpy as np

    y = np.asarray(y, float)
    if len(y) < 3:
        return y
    out = y.copy()
    out[1:-1] = (y[:-2] + y[1:-1] + y[2:]) / 3.0
    return out


def steps_to_reach(steps, losses, target: float) -> float | None:
    """First step (linear interpolation between evals) where `losses` falls to `target`."""
    prev_s, prev_l = 0, None
    for s, val in zip(steps, losses):
        if val <= target:
            if prev_l is None or prev_l == val:
                return float(s)
            return prev_s + (s - prev_s) * (prev_l - target) / (prev_l - val)
        prev_s, prev_l = s, val
    return None


def _mean_curve(result, lr):
    import numpy as np

    cols = [j for j, (m_lr, _) in enumerate(result["members"]) if m_lr == lr]
    curves = np.asarray(result["eval_loss"])[:, cols]
    return curves.mean(axis=1), curves.min(axis=1), curves.max(axis=1)


def _plot(path, results, best_lr, dense_sweep):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lr in dense_sweep["lrs"]:
        if lr != best_lr:
            mean, _, _ = _mean_curve(dense_sweep["result"], lr)
            ax.plot(dense_sweep["result"]["steps"], mean, lw=0.8, ls=":", label=f"dense lr {lr:g}")
    for res in results:
        mean, lo, hi = _mean_curve(res, best_lr)
        line = ax.plot(res["steps"], _smooth(mean), label=f"{res['label']} (lr {best_lr:g})")[0]
        ax.fill_between(res["steps"], lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("train step")
    ax.set_ylabel("held-out eval loss (token cross-entropy)")
    ax.set_title("Switch vs FLOP-matched dense (seed mean, 3-point smoothed; seed range shaded)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parse_overrides(items: list[str], flag: str = "--switch") -> dict[str, Any]:
    """`KEY=VALUE` strings -> SwitchConfig field values, typed like the field's default."""
    from switch_t5.config import SwitchConfig

    fields = {f.name: f for f in dataclasses.fields(SwitchConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(
                f"{flag}={item!r}: use KEY=VALUE with KEY a SwitchConfig field, e.g. "
                f"{flag}=train_capacity_factor=2.0"
            )
        default, annotation = fields[key].default, str(fields[key].type)
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int) or annotation.startswith("int"):  # or int | None
            out[key] = int(value)
        elif isinstance(default, float) or annotation.startswith("float"):
            out[key] = float(value)
        elif annotation.startswith("tuple[int"):
            out[key] = tuple(int(v) for v in value.split(",") if v)
        else:
            out[key] = value
    return out


def _cached_population(out_dir: str, reuse: bool, key: dict[str, Any], train_fn):
    """Runs `train_fn()` or, with `reuse`, loads its result saved under the same settings."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = os.path.join(out_dir, f"population_{digest[:16]}.json")
    if reuse and os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
        res["members"] = [tuple(m) for m in res["members"]]
        print(f"{res['label']:>10}: reused {path} (same data, model and schedule)", flush=True)
        return res
    res = train_fn()
    with open(path, "w") as f:
        json.dump({**res, "key": key}, f, default=str)
    return res


def _speedup(dense_res, res, lr_dense: float, lr_switch: float, steps: int):
    """(steps the Switch model needs to reach the dense final loss, speedup, final losses)."""
    dense_mean = _smooth(_mean_curve(dense_res, lr_dense)[0])
    target = float(dense_mean[-1])
    mean = _smooth(_mean_curve(res, lr_switch)[0])
    reach = steps_to_reach(res["steps"], mean, target)
    return reach, (steps / reach if reach else 0.0), float(mean[-1]), target


def speedup_by_horizon(dense_steps, dense_curve, switch_steps, switch_curve):
    """Per dense eval step T: (T, Switch steps to reach the dense loss at T, T / those steps).

    The rsqrt schedule does not depend on the total step count, so a run of S steps holds the
    same comparison for every shorter budget T <= S (the learning rate was swept for S only).
    The curves are the smoothed seed means; None when the Switch curve never gets there.
    """
    out = []
    for t, target in zip(dense_steps, dense_curve):
        reach = steps_to_reach(switch_steps, switch_curve, float(target))
        out.append((int(t), reach, t / reach if reach else None))
    return out


# Routing variants, each a row against the 8-expert Switch baseline at the same steps, learning
# rate and seeds (SwitchConfig fields on top of the baseline's). Nothing of them is tuned.
BIAS_FIELD = "router_bias_update_rate"
VARIANTS = ("expert_choice_encoder", "bias_balancing", "shared_fine_grained")


def variant_fields(name: str, d_ff: int, bias_rate: float, fields) -> tuple[dict, str | None]:
    """(SwitchConfig overrides of a variant row, None) or ({}, why the row is skipped).

    expert_choice_encoder: expert choice (arXiv 2202.09368) in the encoder, top-1 in the decoder.
    bias_balancing: auxiliary-loss-free balancing (a per-expert bias on the router logits, moved
      by `bias_rate` per step; DeepSeek-V3's 1e-3 by default) with the load-balancing loss off.
    shared_fine_grained: DeepSeekMoE (arXiv 2401.06066): 1 shared + 32 routed experts of d_ff/4,
      top-3, capacity cf x k x tokens / experts: active width d_ff (1 + 3 quarters, as Switch's
      one expert) and routed expert params those of 8 experts of d_ff.
    """
    if name == "expert_choice_encoder":
        return {"router_type": "experts_choose", "decoder_router_type": "switch"}, None
    if name == "bias_balancing":
        if BIAS_FIELD not in fields:
            return {}, f"skipped: this version's SwitchConfig has no {BIAS_FIELD} field"
        return {BIAS_FIELD: bias_rate, "load_balancing_loss_weight": 0.0}, None
    if name == "shared_fine_grained":
        return {
            "num_experts": 32,
            "expert_d_ff": d_ff // 4,
            "num_shared_experts": 1,
            "router_type": "topk",
            "num_selected_experts": 3,
            "capacity_scales_with_k": True,
        }, None
    raise SystemExit(f"--variants: unknown variant {name!r}; use {', '.join(VARIANTS)}")


def _spread(values) -> str:
    import numpy as np

    v = np.asarray(values, float)
    return f"{v.mean():.4f} +- {(v.max() - v.min()) / 2:.4f}"


def variant_row(base, res, lr: float, steps: int) -> dict[str, Any]:
    """One table row: final eval cross-entropy per seed, the steps-speedup over the baseline
    (baseline steps / steps to reach its final smoothed seed-mean loss; 0 = never), and the
    routing statistics at `lr` averaged over the logged steps of the second half of training."""
    import numpy as np

    cols = [j for j, (m_lr, _) in enumerate(res["members"]) if m_lr == lr]
    reach, speedup, _, _ = _speedup(base, res, lr, lr, steps)
    late = [t for t in res["train_stats"] if t["step"] > steps // 2]

    def stat(name, layers=slice(None)):
        rows = [np.asarray(t[name])[cols][..., layers] for t in late if t.get(name) is not None]
        return float(np.mean(rows)) if rows and np.size(rows) else float("nan")

    n_enc = res.get("encoder_moe_layers", 0)

    return {
        "eval_ce": np.asarray(res["eval_loss"])[-1, cols].tolist(),
        "steps_to_base_final": reach,
        "speedup": speedup,
        "busiest_routed": stat("max_expert_share"),
        "busiest_processed_encoder": stat("processed_share_by_layer", slice(None, n_enc)),
        "busiest_processed_decoder": stat("processed_share_by_layer", slice(n_enc, None)),
        "dropped_train": stat("fraction_dropped"),
        "dropped_eval": float(
            np.mean(np.asarray(res["train_stats"][-1]["eval_fraction_dropped"])[cols])
        ),
    }


def print_variant_table(rows: dict[str, dict[str, Any]], notes: dict[str, str]) -> None:
    print(
        "routing variants vs switch-8e (same steps, lr and seeds; eval CE mean +- half range over "
        "seeds; busiest = busiest expert's load / mean load, routed before capacity (token-choice "
        "layers) and processed after it (encoder / decoder MoE layers), mean over the second half "
        "of training; "
        "dropped: token choice (token, choice) pairs, expert choice tokens no expert took)"
    )
    print(
        f"  {'row':<22} {'eval CE':>17} {'speedup':>8} {'busiest routed':>15} "
        f"{'busiest processed enc/dec':>26} {'dropped train':>14} {'dropped eval':>13}"
    )
    for label, r in rows.items():
        print(
            f"  {label:<22} {_spread(r['eval_ce']):>17} {r['speedup']:>7.2f}x "
            f"{r['busiest_routed']:>15.2f} "
            f"{r['busiest_processed_encoder']:>18.2f} / {r['busiest_processed_decoder']:<5.2f} "
            f"{r['dropped_train']:>14.3f} {r['dropped_eval']:>13.3f}"
        )
    for label, note in notes.items():
        print(f"  {label:<22} {note}")


def _run_variants(names, bias_rate, base_fields, results, lr, steps, population):
    """Trains the variant rows (and the 8-expert baseline when the run has none) at `lr`;
    prints the table. Returns (rows, notes of skipped rows, the variants' populations)."""
    from switch_t5.config import SwitchConfig

    fields = {f.name for f in dataclasses.fields(SwitchConfig)}
    base_fields = {**base_fields, "num_experts": 8}
    base = next((r for r in results if r["label"] == "switch-8e"), None)
    if base is None:
        base = population(SwitchConfig(**base_fields), (lr,), "switch-8e")
    rows, notes, trained = {"switch-8e": variant_row(base, base, lr, steps)}, {}, []
    for name in names:
        overrides, note = variant_fields(name, base_fields["d_ff"], bias_rate, fields)
        if note:
            notes[name] = note
            print(f"{name}: {note}", flush=True)
            continue
        res = population(SwitchConfig(**{**base_fields, **overrides}), (lr,), name)
        rows[name] = variant_row(base, res, lr, steps)
        trained.append(res)
    print_variant_table(rows, notes)
    return rows, notes, trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, <= ~10 min on 2 CPUs")
    parser.add_argument("--setting", default=None, choices=sorted(SETTINGS))
    parser.add_argument("--out", default=os.path.join("/tmp", "switch_t5_bench_quality"))
    parser.add_argument("--source", default=None, choices=("c4", "embedded"))
    parser.add_argument("--heldout", type=float, default=0.05, help="C4 documents held out")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--vocab", type=int, default=None, help="SentencePiece vocabulary size")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="SwitchConfig size field for every model (dense and Switch), repeatable",
    )
    parser.add_argument("--eval_every", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--lrs", default=None, help="comma-separated rsqrt base learning rates")
    parser.add_argument("--experts", default="8,32", help="comma-separated Switch expert counts")
    parser.add_argument(
        "--switch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="SwitchConfig field for the Switch models only (routing experiments), repeatable",
    )
    parser.add_argument(
        "--switch_lrs",
        default=None,
        help="also train the Switch models at these base learning rates (an extra figure; the "
        "headline always uses the dense model's best)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="load populations already trained under the same settings from --out",
    )
    parser.add_argument(
        "--dense_variant",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also train a dense model with this SwitchConfig change at the dense best learning "
        "rate (a diagnostic, e.g. d_ff=1024: do more parameters help at this budget at all?)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="routing variants to train as rows against the 8-expert Switch model at the dense "
        f"best learning rate (comma-separated, 'none' for no rows): {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--bias_rate",
        type=float,
        default=1e-3,
        help=f"SwitchConfig.{BIAS_FIELD} of the bias_balancing row (DeepSeek-V3's 1e-3)",
    )
    parser.add_argument("--prepare_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    setting = args.setting or ("quick" if args.quick else "full")
    s = dict(SETTINGS[setting])
    for name in ("steps", "seeds", "batch", "eval_every", "vocab"):
        if getattr(args, name):
            s[name] = getattr(args, name)
    if args.lrs:
        s["lrs"] = tuple(float(v) for v in args.lrs.split(","))
    source = args.source or ("c4" if os.path.exists(C4_SAMPLE) else "embedded")
    if source == "c4" and not os.path.exists(C4_SAMPLE):
        raise SystemExit(f"--source=c4 but {C4_SAMPLE} does not exist; use --source=embedded")
    os.makedirs(args.out, exist_ok=True)
    if args.prepare_only:
        prepare_data(args.out, s, source, args.heldout)
        return
    expert_counts = tuple(int(v) for v in args.experts.split(","))
    variants = [v for v in args.variants.split(",") if v and v != "none"]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; use {', '.join(VARIANTS)} or none")
    s["model"] = {**s["model"], **_parse_overrides(args.model, "--model")}
    switch_overrides = _parse_overrides(args.switch)

    t_start = time.perf_counter()
    meta = _data(args.out, s, source, args.heldout, setting)
    import jax
    import numpy as np

    # Reruns (other seeds, steps or learning rates) reuse the compiled programs.
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_utils

    from switch_t5.config import SwitchConfig, pad_vocab_size
    from switch_t5.trainer import MODEL_FEATURES

    data = np.load(os.path.join(args.out, "data.npz"))
    train = {k: data[f"train/{k}"] for k in MODEL_FEATURES}
    # All held-out rows in one eval batch (or a few): fewer, larger calls.
    evals = {k: data[f"eval/{k}"] for k in MODEL_FEATURES}
    rows = evals["encoder_input_tokens"].shape[0] * evals["encoder_input_tokens"].shape[1]
    n_eval = -(-rows // 256)
    while rows % n_eval:
        n_eval += 1
    evals = {k: v.reshape(n_eval, rows // n_eval, *v.shape[2:]) for k, v in evals.items()}
    if s["steps"] > meta["train_batches"]:
        raise SystemExit(
            f"--steps={s['steps']} exceeds the {meta['train_batches']} batches of one epoch of "
            f"the train data; use at most {meta['train_batches']} steps (the budget must stay "
            "under one epoch)"
        )
    tokens_per_step = s["batch"] * (s["inputs"] + s["targets"])
    print(
        f"{bench_utils.backend_note()}; {bench_utils.load_note()}\n"
        f"data: {meta['source']} ({meta['task']}, documents {meta['documents']}), vocabulary "
        f"{meta['vocab_size']}, one epoch = {meta['train_batches']} batches of {s['batch']} x "
        f"({s['inputs']} + {s['targets']}); training {s['steps']} steps = "
        f"{s['steps'] / meta['train_batches']:.0%} of an epoch ({s['steps'] * tokens_per_step:,} "
        f"tokens); eval on {meta['eval_batches']} held-out batches "
        f"({meta['eval_target_tokens']:,} target tokens) every {s['eval_every']} steps"
    )
    model_fields = {
        "vocab_size": pad_vocab_size(meta["vocab_size"]),
        **s["model"],
        # Pretraining without dropout on a budget under one epoch (as T5.1.1 / ST-MoE).
        "dropout_rate": 0.0,
        "dtype": "float32",
        "group_size": s["batch"] * s["inputs"] // 4,
        "router_jitter_noise": 0.0,
        **s.get("routing", {}),
    }
    dense_cfg = SwitchConfig(**model_fields, num_experts=0)
    switch_cfgs = {
        e: SwitchConfig(**{**model_fields, **switch_overrides}, num_experts=e)
        for e in expert_counts
    }
    some = switch_cfgs[expert_counts[-1]]
    print(
        f"models: d_model {dense_cfg.d_model}, d_ff {dense_cfg.d_ff}, heads "
        f"{dense_cfg.num_heads}x{dense_cfg.head_dim}, layers {dense_cfg.num_encoder_layers}+"
        f"{dense_cfg.num_decoder_layers}; Switch: MoE in layers {some.sparse_layers('encoder')} "
        f"of the encoder and {some.sparse_layers('decoder')} of the decoder, groups of "
        f"{some.group_size} tokens, train cf {some.train_capacity_factor}, eval cf "
        f"{some.eval_capacity_factor}, load-balancing weight {some.load_balancing_loss_weight}, "
        f"router z-loss weight {some.router_z_loss_weight}, jitter {some.router_jitter_noise}, "
        f"router init stddev {some.router_init_stddev}"
        + (f" (overrides {switch_overrides})" if switch_overrides else "")
        + f"; Adafactor, rsqrt schedule (warm-up {s['warmup']}), {s['seeds']} seeds",
        flush=True,
    )
    common = (s["warmup"], train, evals, s["steps"], s["eval_every"])
    run_key = {
        "data": meta,
        "steps": s["steps"],
        "eval_every": s["eval_every"],
        "warmup": s["warmup"],
        "seeds": s["seeds"],
    }

    def population(cfg, lrs, label):
        key = {**run_key, "config": dataclasses.asdict(cfg), "lrs": list(lrs)}
        return _cached_population(
            args.out,
            args.reuse,
            key,
            lambda: _population(cfg, lrs, s["seeds"], *common, label),
        )

    dense_res = population(dense_cfg, s["lrs"], "dense")
    finals = {lr: float(_mean_curve(dense_res, lr)[0][-1]) for lr in s["lrs"]}
    best_lr = min(finals, key=finals.get)
    print(
        "dense learning-rate sweep (final eval loss, seed mean): "
        + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in finals.items())
        + f" -> {best_lr:g}"
        + (
            " (an end of the sweep: widen --lrs)"
            if len(s["lrs"]) > 1 and best_lr in (s["lrs"][0], s["lrs"][-1])
            else ""
        )
    )
    switch_lrs = [best_lr]
    if args.switch_lrs:
        switch_lrs += [float(v) for v in args.switch_lrs.split(",") if float(v) != best_lr]
    results = [dense_res]
    for experts, cfg in switch_cfgs.items():
        results.append(population(cfg, tuple(switch_lrs), f"switch-{experts}e"))
    if args.dense_variant:
        variant = _parse_overrides(args.dense_variant, "--dense_variant")
        label = "dense[" + ",".join(f"{k}={v}" for k, v in variant.items()) + "]"
        cfg = dataclasses.replace(dense_cfg, **variant)
        results.append(population(cfg, (best_lr,), label))

    summary = {}
    for res in results[1:]:
        reach, speedup, final, target = _speedup(dense_res, res, best_lr, best_lr, s["steps"])
        last = res["train_stats"][-1]
        cols = [j for j, (m_lr, _) in enumerate(res["members"]) if m_lr == best_lr]

        def at_best(name, last=last, cols=cols):
            # nan for statistics a population saved by an older version of this script lacks.
            return float(np.mean(np.asarray(last[name])[cols])) if name in last else float("nan")

        summary[res["label"]] = {"steps_to_dense_final": reach, "speedup": speedup}
        line = (
            f"{res['label']}: {res['params']:,} params, final eval loss {final:.4f} vs dense "
            f"{target:.4f}; reaches the dense final loss at step "
            f"{reach if reach is None else round(reach)} -> speedup {speedup:.2f}x"
        )
        if res["num_experts"]:
            line += (
                f"; dropped at the last eval {at_best('eval_fraction_dropped'):.3f}; last train "
                f"step: dropped {at_best('fraction_dropped'):.3f}, load-balancing loss "
                f"{at_best('load_balancing_loss'):.3f}, router confidence "
                f"{at_best('router_confidence'):.3f} (uniform {1 / res['num_experts']:.3f}), "
                f"busiest expert {at_best('max_expert_share'):.2f}x the uniform share"
            )
        print(line)
        # Run-to-run spread: dense seed i against Switch seed i, each curve smoothed alone.
        per_seed = []
        for seed in range(s["seeds"]):
            d_col = dense_res["members"].index((best_lr, seed))
            s_col = res["members"].index((best_lr, seed))
            d_curve = _smooth(np.asarray(dense_res["eval_loss"])[:, d_col])
            s_curve = _smooth(np.asarray(res["eval_loss"])[:, s_col])
            got = steps_to_reach(res["steps"], s_curve, float(d_curve[-1]))
            per_seed.append(s["steps"] / got if got else 0.0)
        summary[res["label"]]["speedup_per_seed"] = per_seed
        print(f"  {res['label']} speedup per seed pair: " + ", ".join(f"{v:.2f}" for v in per_seed))
        horizon = speedup_by_horizon(
            dense_res["steps"],
            _smooth(_mean_curve(dense_res, best_lr)[0]),
            res["steps"],
            _smooth(_mean_curve(res, best_lr)[0]),
        )
        summary[res["label"]]["speedup_by_horizon"] = horizon
        print(
            f"  {res['label']} speedup if the budget ended at step T (T: speedup): "
            + ", ".join(f"{t}: {r:.2f}" if r else f"{t}: -" for t, _, r in horizon)
        )
        for lr in switch_lrs[1:]:
            reach_lr, speedup_lr, final_lr, _ = _speedup(dense_res, res, best_lr, lr, s["steps"])
            summary[res["label"]][f"speedup_at_lr_{lr:g}"] = speedup_lr
            print(
                f"  extra: {res['label']} at its own lr {lr:g}: final eval loss {final_lr:.4f}, "
                f"reaches the dense final loss at step "
                f"{reach_lr if reach_lr is None else round(reach_lr)} -> {speedup_lr:.2f}x"
            )
    variant_rows, variant_notes = {}, {}
    if variants:
        variant_rows, variant_notes, trained = _run_variants(
            variants,
            args.bias_rate,
            {**model_fields, **switch_overrides},
            results,
            best_lr,
            s["steps"],
            population,
        )
        results += trained
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(
            {
                "variants": variant_rows,
                "variant_notes": variant_notes,
                "setting": s,
                "switch_overrides": switch_overrides,
                "data": meta,
                "best_lr": best_lr,
                "dense_lr_sweep": finals,
                "results": results,
                "summary": summary,
            },
            f,
        )
    plot = os.path.join(args.out, "quality.png")
    _plot(plot, results, best_lr, {"lrs": s["lrs"], "result": dense_res})
    print(
        f"plot {plot}, curves {os.path.join(args.out, 'quality.json')}; total "
        f"{time.perf_counter() - t_start:.0f} s; {bench_utils.load_note()}"
    )
    for experts in expert_counts:
        print(f"steps_speedup_{experts}e: {summary[f'switch-{experts}e']['speedup']:.1f}")


if __name__ == "__main__":
    main()
