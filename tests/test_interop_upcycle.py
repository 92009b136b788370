"""Sparse upcycling: every expert a copy of the dense MLP, a fresh router, from a gin config."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import linen as nn

from switch_t5 import checkpoints, convert, network
from switch_t5.config import SwitchConfig
from switch_t5.interop import checkpoint_io

DENSE = SwitchConfig(
    vocab_size=128, d_model=8, num_heads=2, head_dim=3, d_ff=16, num_encoder_layers=2,
    num_decoder_layers=2, num_experts=0, dtype="float32", relative_attention_num_buckets=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dense"))
    params = nn.unbox(network.init_variables(DENSE, jax.random.key(0))["params"])
    ckpt = checkpoints.Checkpointer(path, async_save=False)
    ckpt.save(100, {"params": params, "step": np.int32(100)}, {}, checkpoints.make_meta(DENSE))
    ckpt.close()
    return path, jax.tree.map(np.asarray, params)


def test_upcycle_from_gin_copies_the_dense_mlp_into_every_expert(dense_dir, tmp_path):
    path, dense = dense_dir
    gin_file = tmp_path / "sparse.gin"
    gin_file.write_text(checkpoint_io.config_to_gin(dataclasses.replace(DENSE, num_experts=4)))
    convert.main(["upcycle", f"--src={path}", f"--dst={tmp_path / 'moe'}",
                  f"--gin_file={gin_file}", "--dtype=float32"])  # fmt: skip
    config, params = checkpoint_io.load_params(str(tmp_path / "moe"))
    assert config.num_experts == 4 and config.sparse_layers("encoder") == (1,)
    for stack in ("encoder", "decoder"):
        mlp = params[stack]["layers_1"]["mlp"]
        for w in ("wi", "wo"):
            kernel = mlp["expert"][w]["kernel"]
            assert kernel.shape[0] == 4
            for e in range(4):
                np.testing.assert_array_equal(
                    kernel[e], dense[stack]["layers_1"]["mlp"][w]["kernel"]
                )
        router = mlp["router"]["w"]["kernel"]
        assert router.shape == (8, 4) and 0 < router.std() < 0.1  # fresh N(0, 0.02)
        np.testing.assert_array_equal(
            params[stack]["layers_0"]["mlp"]["wi"]["kernel"],
            dense[stack]["layers_0"]["mlp"]["wi"]["kernel"],
        )
    np.testing.assert_array_equal(
        params["token_embedder"]["embedding"], dense["token_embedder"]["embedding"]
    )
    assert (tmp_path / "moe" / "model.gin").exists()


def test_upcycle_refuses_other_sizes(dense_dir, tmp_path):
    path, _ = dense_dir
    from switch_t5.interop import upcycle

    with pytest.raises(ValueError, match="d_ff: dense 16 != sparse 32"):
        upcycle.upcycle(
            path, str(tmp_path / "x"), dataclasses.replace(DENSE, num_experts=4, d_ff=32)
        )


def test_upcycle_between_scanned_layouts_matches_unscanned(dense_dir, tmp_path):
    """A scanned dense source and a scanned target give the unscanned result, stacked."""
    from switch_t5 import scan_utils
    from switch_t5.interop import upcycle

    path, dense = dense_dir
    dense_scanned = dataclasses.replace(DENSE, scan_layers=True)
    src = str(tmp_path / "dense_scan")
    ckpt = checkpoints.Checkpointer(src, async_save=False)
    params = scan_utils.scan_params(dense, dense_scanned)
    meta = checkpoints.make_meta(dense_scanned)
    ckpt.save(100, {"params": params, "step": np.int32(100)}, {}, meta)
    ckpt.close()
    sparse = dataclasses.replace(DENSE, num_experts=4)
    upcycle.upcycle(path, str(tmp_path / "ref"), sparse, seed=1)
    scanned = dataclasses.replace(sparse, scan_layers=True)
    upcycle.upcycle(src, str(tmp_path / "scan"), scanned, seed=1)
    _, ref = checkpoint_io.load_params(str(tmp_path / "ref"))
    config, got = checkpoint_io.load_params(str(tmp_path / "scan"))
    assert config.scan_layers and scan_utils.is_scanned(got)
    got = scan_utils.unscan_params(got, config)
    jax.tree.map(np.testing.assert_array_equal, got, ref)
