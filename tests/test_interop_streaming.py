"""Streaming conversion: chunk geometry, safetensors byte runs, and the peak memory of a
conversion whose largest tensor is 4x the memory budget (measured in a fresh subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from switch_t5.interop import streaming

BUDGET = 16 << 20  # 16 MiB
# A Switch model whose stacked expert kernels [16, 256, 4096] f32 are 64 MiB = 4x the budget
# (the shared embedding, 31 MiB, is one HF tensor of ~2x the budget).
SYNTH = dict(
    vocab_size=32128, d_model=256, d_kv=16, d_ff=4096, num_heads=4, num_experts=16,
    num_layers=1, num_sparse_encoder_layers=1, num_decoder_layers=1, num_sparse_decoder_layers=1,
    relative_attention_num_buckets=8, model_type="switch_transformers", dense_act_fn="relu",
    tie_word_embeddings=True, expert_capacity=64,
)  # fmt: skip


def test_byte_runs_and_chunks():
    shape = (3, 4, 5)
    full = np.arange(60).reshape(shape)
    for index in [(1,), (slice(0, 3), slice(1, 3)), (2, slice(0, 4), slice(2, 4)), ()]:
        flat = np.concatenate(
            [full.reshape(-1)[o : o + n] for o, n in streaming.byte_runs(shape, 1, index)]
        )
        np.testing.assert_array_equal(flat, full[index].reshape(-1))
    assert streaming.chunk_shape((16, 256, 4096), 4, 4 << 20) == (1, 256, 4096)  # one expert
    assert streaming.chunk_shape((16, 256, 4096), 4, 1 << 20) == (1, 64, 4096)
    boxes = list(streaming.chunk_regions((5, 3), (2, 3)))
    assert [(b[0].start, b[0].stop) for b in boxes] == [(0, 2), (2, 4), (4, 5)]


def test_safetensors_sink_and_source_round_trip_strided_regions(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 5)).astype(np.float32)
    b = rng.normal(size=(3, 4, 6)).astype(streaming.ml_dtypes.bfloat16)
    sink = streaming.SafetensorsSink(str(tmp_path), max_shard_bytes=100)
    sink.open(
        {"a": streaming.TargetSpec(a.shape, a.dtype), "b": streaming.TargetSpec(b.shape, b.dtype)}
    )
    sink.write("a", (slice(0, 7), slice(0, 2)), a[:, :2])  # column blocks: strided writes
    sink.write("a", (slice(0, 7), slice(2, 5)), a[:, 2:])
    sink.write("b", (), b)
    sink.close()
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    src = streaming.SafetensorsSource(str(tmp_path))
    np.testing.assert_array_equal(src.read("a", ()), a)
    np.testing.assert_array_equal(src.read("a", (slice(1, 6), slice(3, 5))), a[1:6, 3:5])
    np.testing.assert_array_equal(src.read("b", (2, slice(1, 3))), b[2, 1:3])
    with pytest.raises(KeyError, match="not in the safetensors files"):
        src.read("c", ())


def _write_synthetic_hf(path, **changes):
    """Random weights of SYNTH in HF names, written chunk by chunk (never whole in memory)."""
    from switch_t5.interop import hf

    synth = SYNTH | changes
    config = hf.config_from_hf(
        synth,
        [
            "encoder.block.0.layer.1.mlp.router.classifier.weight",
            "decoder.block.0.layer.2.mlp.router.classifier.weight",
        ],
        dtype="float32",
    )
    plan = hf.export_plan(config, synth["vocab_size"])
    sink = streaming.SafetensorsSink(path)
    sink.open(plan.targets)
    rng = np.random.default_rng(0)
    for name, t in plan.targets.items():
        for box in streaming.chunk_regions(t.shape, streaming.chunk_shape(t.shape, 4, 4 << 20)):
            shape = streaming.region_shape(t.shape, box)
            sink.write(name, box, rng.standard_normal(shape, dtype=np.float32))
    sink.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(synth, f)
    # The largest tensor of the converted checkpoint: a stacked expert kernel.
    return max(int(np.prod(t.shape)) * 4 for t in hf._our_targets(config).values())


_MEASURE = textwrap.dedent(
    """
    import json, sys, tracemalloc
    from switch_t5.interop import hf, checkpoint_io

    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    src, ckpt, back, budget, warm = sys.argv[1:4] + [int(sys.argv[4]), sys.argv[5]]
    # A tiny conversion first: imports, TensorStore/orbax thread pools and caches are then in
    # place, and the peak below is what the data adds.
    # (The synthetic HF folders have no spiece.model: the weights are exported alone.)
    hf.orbax_to_hf(hf.hf_to_orbax(warm, warm + "_ckpt", budget_bytes=budget) and warm + "_ckpt",
                   warm + "_back", budget_bytes=budget, tokenizer=False)
    out = {}
    for name, fn in (
        ("hf_to_orbax", lambda: hf.hf_to_orbax(src, ckpt, budget_bytes=budget, dtype="float32")),
        ("orbax_to_hf", lambda: hf.orbax_to_hf(ckpt, back, budget_bytes=budget, tokenizer=False)),
    ):
        base = rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        tracemalloc.start()
        stats = fn()
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[name] = dict(peak_rss_increase=rss("VmHWM") - base, tracemalloc_peak=traced,
                         max_chunk=stats.max_chunk_bytes, written=stats.bytes_written)
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_streamed_conversion_stays_under_the_memory_budget(tmp_path):
    largest = _write_synthetic_hf(str(tmp_path / "hf"))
    assert largest >= 4 * BUDGET  # the stacked [16, 256, 4096] expert kernels
    _write_synthetic_hf(str(tmp_path / "warm"), vocab_size=300, d_model=16, d_ff=64, num_experts=2)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "hf"), str(tmp_path / "ckpt"),
         str(tmp_path / "back"), str(BUDGET), str(tmp_path / "warm")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in result.items():
        print(
            f"{name}: largest tensor {largest / 2**20:.0f} MiB, budget {BUDGET / 2**20:.0f} MiB, "
            f"peak RSS increase {r['peak_rss_increase'] / 2**20:.1f} MiB, tracemalloc peak "
            f"{r['tracemalloc_peak'] / 2**20:.1f} MiB, largest chunk "
            f"{r['max_chunk'] / 2**20:.1f} MiB"
        )
        assert r["written"] > largest
        assert r["max_chunk"] <= BUDGET // 16
        assert r["tracemalloc_peak"] <= BUDGET
        assert r["peak_rss_increase"] <= BUDGET
    a = streaming.SafetensorsSource(str(tmp_path / "hf"))
    b = streaming.SafetensorsSource(str(tmp_path / "back"))
    assert a.names() == b.names()
    for n in ("encoder.block.0.layer.1.mlp.experts.expert_15.wo.weight", "shared.weight"):
        assert np.array_equal(a.read(n, (slice(0, 7),)), b.read(n, (slice(0, 7),)))
