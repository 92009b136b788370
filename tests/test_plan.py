"""The partition planner: mesh checks and recommendation, collectives, FLOPs, the compiled step."""

import dataclasses
import os
import re
import subprocess
import sys

import gin
import numpy as np
import pytest
from tiny import TINY_FIELDS, tiny_config

from switch_t5 import gin_utils, partitioning, plan

# Odd sizes (embed 8, head_dim 3, mlp 16, 4 experts) so that a swapped axis changes the bytes.
_SIZES = dict(vocab_size=256, num_encoder_layers=4, num_decoder_layers=4, group_size=16)
TINY = tiny_config(**_SIZES)
# The same sizes over configs/models/tiny.gin, MoE in bfloat16.
TINY_BINDINGS = [
    f"--gin.switch_t5.SwitchConfig.{k}={v!r}"
    for k, v in {**TINY_FIELDS, **_SIZES, "moe_dtype": "bfloat16"}.items()
]
SPEC = plan.StepSpec(batch=16, inputs_length=16, targets_length=8)


def test_parse_and_resolve_mesh():
    assert plan.parse_mesh("data:2,expert:4,model:1") == {"data": 2, "expert": 4, "model": 1}
    assert plan.parse_mesh("expert:8") == {"data": 1, "expert": 8, "model": 1}
    assert plan.resolve_mesh(plan.parse_mesh("data:-1,expert:4"), 64) == (
        {"data": 16, "expert": 4, "model": 1},
        64,
    )
    with pytest.raises(plan.PlanError, match="data:D,expert:E,model:M"):
        plan.parse_mesh("data:2,experts:4")
    with pytest.raises(plan.PlanError, match="has 8 devices but --devices=16"):
        plan.resolve_mesh(plan.parse_mesh("data:2,expert:2,model:2"), 16)


def _problems(config, mesh, spec):
    lengths = {"inputs": spec.inputs_length, "targets": spec.targets_length}
    return partitioning.mesh_problems(config, mesh, spec.batch, spec.num_microbatches, lengths)


def test_mesh_problems_name_the_fix():
    ok = {"data": 2, "expert": 2, "model": 2}
    assert _problems(TINY, ok, SPEC) == []
    problems = _problems(TINY, {"data": 1, "expert": 8, "model": 1}, SPEC)
    assert any("does not divide num_experts=4" in p for p in problems)
    problems = _problems(TINY, {"data": 1, "expert": 1, "model": 4}, SPEC)
    assert problems == ["the model axis (4) does not divide num_heads=2; use a divisor of 2"]
    problems = _problems(TINY, ok, dataclasses.replace(SPEC, batch=6))
    assert any("6 sequences per microbatch cannot be split" in p for p in problems)
    # 16 x 8 decoder tokens in groups of 64 make 2 groups: not a multiple of 4 batch shards.
    problems = _problems(dataclasses.replace(TINY, group_size=64), ok, SPEC)
    assert len(problems) == 1
    assert "decoder's 128 tokens per microbatch make 2 routing groups" in problems[0]
    assert "group_size=32" in problems[0]


def test_recommendation_prefers_the_smallest_model_axis_that_fits():
    model_plan = plan.plan_model(TINY)
    meshes = plan.recommend_meshes(TINY, model_plan, 8, SPEC, usable_bytes=None)
    assert meshes[0] == {"data": 2, "expert": 4, "model": 1}
    assert all(_problems(TINY, m, SPEC) == [] for m in meshes)
    # A budget that model:1 overflows (by the state estimate) but model:2 does not.
    one = plan.estimate_state_bytes(TINY, model_plan, {"data": 2, "expert": 4, "model": 1}, "a")
    two = plan.estimate_state_bytes(TINY, model_plan, {"data": 1, "expert": 4, "model": 2}, "a")
    assert two < one
    meshes = plan.recommend_meshes(TINY, model_plan, 8, SPEC, usable_bytes=2 * (one + two) / 2)
    assert meshes[0] == {"data": 1, "expert": 4, "model": 2}
    with pytest.raises(plan.PlanError, match=r"no .* mesh of 8 devices fits"):
        plan.recommend_meshes(TINY, model_plan, 8, dataclasses.replace(SPEC, batch=3), None)


HLO = """\
HloModule m

%body.1 (p: (s32[], f32[2])) -> (s32[], f32[2]) {
  %a = f32[4,2]{1,0} all-to-all(%x), channel_id=1
  %g = bf16[8]{0} all-gather-start(%y), channel_id=2
  %d = bf16[8]{0} all-gather-done(%g)
}

%cond.2 (p: (s32[], f32[2])) -> pred[] {
  %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main.3 (p: f32[2]) -> f32[2] {
  %w = (s32[], f32[2]{0}) while(%t), condition=%cond.2, body=%body.1, \
backend_config={"known_trip_count":{"n":"6"}}
  %r = f32[2]{0} all-reduce(%z), channel_id=3, to_apply=%add
  %b = (bf16[2]{0}, bf16[2]{0}) all-to-all(%u, %v), channel_id=4
}
"""


def test_collectives_count_loop_bodies_per_iteration():
    counts, dtypes = plan.count_collectives(HLO)
    assert counts == {
        "all-to-all": 7,
        "all-gather": 6,
        "reduce-scatter": 0,
        "all-reduce": 1,
        "collective-permute": 0,
    }
    assert dtypes == ["bf16", "f32"]


# XLA:CPU's form of a scanned FSDP gradient: all-reduce, then each device slices its shard.
RS_HLO = """HloModule m

%body (p: (s32[], f32[8,3])) -> (s32[], f32[8,3]) {
  %g = f32[8,3]{1,0} all-reduce(%x), channel_id=1, to_apply=%add
  %s = f32[2,3]{1,0} dynamic-slice(%g, %i, %j), dynamic_slice_sizes={2,3}
  %a = f32[8,3]{1,0} all-gather(%w), channel_id=2, dimensions={0}
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %w = (s32[], f32[8,3]) while(%t), condition=%c, body=%body, \
backend_config={"known_trip_count":{"n":"5"}}
  %r = bf16[4]{0} all-reduce(%z), channel_id=3, to_apply=%add
}
"""


def test_collective_bytes_count_all_reduce_plus_slice_as_reduce_scatter():
    assert plan.collective_bytes(RS_HLO) == {
        "reduce-scatter": 5 * 8 * 3 * 4,
        "all-gather": 5 * 8 * 3 * 4,
        "all-reduce": 4 * 2,
    }
    counts, _ = plan.count_collectives(RS_HLO)
    assert (counts["reduce-scatter"], counts["all-reduce"]) == (5, 1)


# The forms a scanned FSDP step compiles to (tests/test_fsdp.py's step, abridged): the slice
# inside a fusion, combined all-reduces read through get-tuple-element, groups of 4 devices.
FUSED_RS_HLO = """HloModule m

%fused_slice (param_0.1: f32[8,3], param_1.2: s32[]) -> f32[2,3] {
  %param_0.1 = f32[8,3]{1,0} parameter(0)
  %param_1.2 = s32[] parameter(1)
  ROOT %dynamic-slice.7 = f32[2,3]{1,0} dynamic-slice(%param_0.1, %param_1.2, %c), \
dynamic_slice_sizes={2,3}
}

%fused_convert (param_0.4: f32[8,3]) -> bf16[8,3] {
  %param_0.4 = f32[8,3]{1,0} parameter(0)
  ROOT %convert.5 = bf16[8,3]{1,0} convert(%param_0.4)
}

%fused_convert_slice (param_0.5: f32[2,2,3], param_1.6: bf16[8,3], param_2.7: s32[]) -> f32[2,2,3] {
  %param_0.5 = f32[2,2,3]{2,1,0} parameter(0)
  %param_1.6 = bf16[8,3]{1,0} parameter(1)
  %param_2.7 = s32[] parameter(2)
  %convert.8 = f32[8,3]{1,0} convert(%param_1.6)
  %dynamic-slice.9 = f32[2,3]{1,0} dynamic-slice(%convert.8, %param_2.7, %c), \
dynamic_slice_sizes={2,3}
  %bitcast.10 = f32[1,2,3]{2,1,0} bitcast(%dynamic-slice.9)
  ROOT %dus.11 = f32[2,2,3]{2,1,0} dynamic-update-slice(%param_0.5, %bitcast.10, %param_2.7, %c, %c)
}

%fused_whole (param_0.3: f32[1,8,8]) -> f32[1,1,8,8] {
  %param_0.3 = f32[1,8,8]{2,1,0} parameter(0)
  ROOT %bitcast.9 = f32[1,1,8,8]{3,2,1,0} bitcast(%param_0.3)
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %ar.1 = f32[8,3]{1,0} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %f.1 = f32[2,3]{1,0} fusion(%ar.1, %i), kind=kLoop, calls=%fused_slice
  %ar.2 = (f32[1,8,8]{2,1,0}, f32[8,3]{1,0}) all-reduce(%y, %z), channel_id=2, \
replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %gte.0 = f32[1,8,8]{2,1,0} get-tuple-element(%ar.2), index=0
  %gte.1 = f32[8,3]{1,0} get-tuple-element(%ar.2), index=1
  %f.2 = f32[1,1,8,8]{3,2,1,0} fusion(%gte.0), kind=kLoop, calls=%fused_whole
  %f.3 = f32[2,3]{1,0} fusion(%gte.1, %i), kind=kLoop, calls=%fused_slice
  %ar.3 = f32[8,3]{1,0} all-reduce(%w), channel_id=3, replica_groups=[4,2]<=[8], to_apply=%add
  %f.4 = f32[2,3]{1,0} fusion(%ar.3, %i), kind=kLoop, calls=%fused_slice
  %ar.5 = f32[8,3]{1,0} all-reduce(%v), channel_id=4, replica_groups=[2,4]<=[8], to_apply=%add
  %cv.6 = bf16[8,3]{1,0} fusion(%ar.5), kind=kLoop, calls=%fused_convert
  %f.7 = f32[2,2,3]{2,1,0} fusion(%acc, %cv.6, %i), kind=kLoop, calls=%fused_convert_slice
}
"""


def test_reduce_scatter_found_through_fusions_and_combined_all_reduces():
    computations, entry = plan.split_computations(FUSED_RS_HLO)
    # ar.3's groups are 2 devices but each keeps 1/4: not a reduce-scatter. ar.5 is read
    # through the bfloat16 converts XLA:CPU adds around its float32 collectives.
    assert plan.scattered_all_reduces(computations[entry], computations) == {
        "ar.1": {0},
        "ar.2": {1},
        "ar.5": {0},
    }
    assert plan.collective_bytes(FUSED_RS_HLO) == {
        "reduce-scatter": 3 * 8 * 3 * 4,
        "all-reduce": 8 * 8 * 4 + 8 * 3 * 4,
    }
    counts, _ = plan.count_collectives(FUSED_RS_HLO)
    # ar.2 moves more bytes unscattered (256 vs 96): it counts as an all-reduce.
    assert (counts["reduce-scatter"], counts["all-reduce"]) == (2, 2)


def test_a_mesh_that_does_not_fit_exits_before_compiling():
    gin.clear_config()
    try:
        with pytest.raises(plan.PlanError, match="does not divide num_experts=4"):
            plan.main(
                [
                    "--gin_file=configs/models/tiny.gin",
                    *TINY_BINDINGS,
                    "--mesh=data:1,expert:8,model:1",
                ]
            )
    finally:
        gin.clear_config()


@pytest.mark.slow
def test_planner_compiles_the_real_train_step_and_enforces_the_budget():
    """8 simulated devices in a subprocess; scanned layers; GPU budget too small on purpose."""
    cmd = [
        sys.executable,
        "-m",
        "switch_t5.plan",
        "--gin_file=configs/models/tiny.gin",
        *TINY_BINDINGS,
        "--mesh=data:2,expert:2,model:2",
        "--batch=16",
        "--inputs_length=16",
        "--targets_length=8",
        "--scan=on",
        "--accelerator=gpu",
        "--hbm_gib=0.0004",
    ]
    env = {**os.environ, "PYTHONPATH": gin_utils.REPO_ROOT}
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=gin_utils.REPO_ROOT, timeout=600
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "exceeds the usable 0.00 GiB (0.0004 GiB x XLA's GPU preallocation 0.75)" in (
        result.stderr
    )
    # The fixes it names are the ones this plan does not use yet.
    for fix in ("param_dtype='bfloat16'", "--optimizer_state_dtype=bfloat16", "--remat=full"):
        assert fix in result.stderr, fix
    assert "--num_microbatches=2" in result.stderr
    out = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert out["devices"] == "8"
    assert "scan_layers=True" in out["compiled"] and "moe_dtype=bfloat16" in out["compiled"]
    # CPU runs the bfloat16 all-to-alls in float32, and the line says so.
    assert out["all_to_all_dtypes"].startswith("f32  (XLA:CPU widens bfloat16 collectives")
    # Per device (data 2, expert 2, model 2), in float32 values: embedding 256 x 8 / 2 = 1024;
    # 48 attention kernels of 8 x 6 / 2 = 24 -> 1152; relpos 2 x (2 x 32 / 2) = 64; 22 norms of
    # 8 -> 176; 4 dense MLPs of 2 x 8 x 16 / 2 -> 512; 4 sparse layers of a replicated 8 x 4
    # router and 2 expert kernels of 4 x 8 x 16 / (2 x 2) -> 4 x 288 = 1152. Sum 4080 x 4 bytes.
    assert int(out["per_device_param_bytes"]) == 4080 * 4
    total = int(out["per_device_total_bytes"])
    assert total > int(out["per_device_param_bytes"]) + int(out["per_device_optimizer_bytes"])
    assert out["per_device_gib"].startswith(f"{total / 2**30:.2f}  (an estimate by XLA's CPU")
    # 4 sparse layer calls x (dispatch + combine) x (forward + backward); two of those layers
    # run per iteration of the scanned loops, so the trip counts must be applied.
    assert out["collectives_per_step"].startswith("all-to-all 16, ")
    # The breakdown, the FSDP switch (off for tiny: auto below 0.5B), bytes moved, wall time.
    assert out["per_device_breakdown_gib"].startswith("params 0.00, optimizer state 0.00, grad")
    assert out["fsdp"].startswith("off  (non-expert weights")
    assert "all-to-all" in out["collective_bytes_per_step"]
    assert out["compile_wall_seconds"].startswith("setup ")
    for stage in ("plan: setup ", "plan: lowering ", "plan: compile "):
        assert stage in result.stderr, stage


def test_bfloat16_optimizer_state_halves_its_bytes_and_tracks_float32():
    """The option the planner's --optimizer_state_dtype passes to the real optimizer."""
    import jax
    import jax.numpy as jnp

    from switch_t5 import optim

    params = {"w": jnp.linspace(-1.0, 1.0, 4 * 128 * 136).reshape(4, 128, 136)}
    specs = {"w": jax.sharding.PartitionSpec("expert", "embed", "mlp")}
    grads = {"w": jnp.cos(params["w"] * 7.0)}
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx = optim.make_optimizer(
            "adafactor", optim.make_schedule("constant", 0.01), specs, state_dtype=dtype
        ).tx
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        out[dtype] = (optim.state_bytes(state), updates["w"], state.v_row["w"].dtype)
    assert out["bfloat16"][2] == jnp.bfloat16 and out["float32"][2] == jnp.float32
    # count (int32) + v_row [4, 128] + v_col [4, 136] + the (1,) placeholder.
    assert out["float32"][0] == 4 + 4 * (4 * 128 + 4 * 136 + 1)
    assert out["bfloat16"][0] == 4 + 2 * (4 * 128 + 4 * 136 + 1)
    # The first update reads zero moments, so it is the same; bfloat16 storage is only rounding.
    np.testing.assert_allclose(out["bfloat16"][1], out["float32"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_planner_breakdown_with_fsdp_counts_reduce_scatters():
    """The same tiny step with FSDP: the breakdown's fields, smaller params, reduce-scatters."""
    cmd = [
        sys.executable,
        "-m",
        "switch_t5.plan",
        "--gin_file=configs/models/tiny.gin",
        *TINY_BINDINGS,
        "--gin.switch_t5.SwitchConfig.fsdp=True",
        "--mesh=data:2,expert:2,model:2",
        "--batch=16",
        "--inputs_length=16",
        "--targets_length=8",
        "--scan=on",
    ]
    env = {**os.environ, "PYTHONPATH": gin_utils.REPO_ROOT}
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=gin_utils.REPO_ROOT, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert out["fsdp"].startswith("on  (non-expert weights, gradients and optimizer state sharded")
    # 4080 float32 values per device without FSDP (see the test above); the embedding, attention,
    # dense MLP and router weights now split 4 ways more: 1024 + 1152 + 512 + 4 x 32 -> / 4.
    assert int(out["per_device_param_bytes"]) == (4080 - (1024 + 1152 + 512 + 128) * 3 // 4) * 4
    n = r"\d+\.\d\d"
    assert re.fullmatch(
        rf"params {n}, optimizer state {n}, gradients {n} \(in the temporaries\), "
        rf"activations and other temporaries {n}, batch {n}",
        out["per_device_breakdown_gib"],
    ), out["per_device_breakdown_gib"]
    assert "reduce-scatter" in out["collective_bytes_per_step"]
    assert (
        "(reduce-scatter = XLA:CPU's all-reduce + dynamic-slice)"
        in (out["collective_bytes_per_step"])
    )
    counts = dict(
        kv.rsplit(" ", 1) for kv in out["collectives_per_step"].split(" (")[0].split(", ")
    )
    assert int(counts["reduce-scatter"]) > 0 and int(counts["all-gather"]) > 0
    assert out["compile_wall_seconds"].startswith("setup ")


_LIVE_RANGE = """HloLiveRange (max 9):
  Live ranges at 7 (peak):
    param.1{}: 2048 bytes (cumulative: 2048 bytes)
    square_fusion.3{}: 4096 bytes (cumulative: 6144 bytes)
    tuple.4{1}: 1024 bytes (cumulative: 7168 bytes)
  Stack trace breakdown for peak usage: 7 168 bytes
"""
_PEAK_HLO = """ENTRY %main (param.1: bf16[32,32]) -> f32[32,32] {
  %param.1 = bf16[32,32]{1,0} parameter(0), metadata={op_name="state"}
  %square_fusion.3 = f32[32,32]{1,0} fusion(%param.1), kind=kLoop, calls=%f, \
metadata={op_name="jit(train_step)/square"}
  %tuple.4 = (f32[2]{0}, f32[16,16]{1,0}) while(%t), condition=%c, body=%b, \
metadata={op_name="jit(train_step)/transpose(jvp(EncoderDecoder))/EncoderDecoder.decode/decoder/while"}
}
"""


def test_peak_buffers_groups_the_peak_by_the_op_that_made_each_buffer():
    import importlib.util

    path = os.path.join(gin_utils.REPO_ROOT, "scripts", "peak_buffers.py")
    spec = importlib.util.spec_from_file_location("peak_buffers", path)
    peak_buffers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peak_buffers)
    total, groups = peak_buffers.peak_groups(_LIVE_RANGE, _PEAK_HLO)
    assert total == 7168
    assert groups == [
        ("square (fusion)", 4096, 1, [("f32[32,32]", 1)]),
        ("entry parameters (train state, batch)", 2048, 1, [("bf16[32,32]", 1)]),
        ("transpose(jvp(EncoderDecoder))/decoder/while (while)", 1024, 1, [("f32[16,16]", 1)]),
    ]
