"""The one train-FLOPs formula (`switch_t5.flops`) against counts by hand on tiny configs."""

import dataclasses

import pytest
from tiny import tiny_config

from switch_t5 import flops, network

# Odd sizes (embed 8, heads 2 x 3, mlp 16, 4 experts, vocab 128); inputs and targets of
# different lengths, so that a weight counted on the wrong tokens changes the result.
D, HD, F, E, V = 8, 6, 16, 4, 128
LI, LT, BATCH = 5, 3, 2


def _by_hand(k: int) -> float:
    """2 encoder + 2 decoder layers, layer 1 of each sparse (top-k of 4 experts); tied or not,
    the output projection is [d, vocab]."""
    dense_mlp = 2 * D * F  # wi [d, f], wo [f, d]
    sparse_mlp = D * E + k * 2 * D * F  # the router, and k of the E experts
    enc = 2 * 4 * D * HD + dense_mlp + sparse_mlp
    cross_kv = 2 * 2 * D * HD  # each decoder layer projects the encoder outputs to keys, values
    dec = 2 * (4 + 2) * D * HD + dense_mlp + sparse_mlp + V * D  # self + cross q/o, the logits
    attention = 4 * HD * (2 * LI * LI + 2 * LT * (LT + LI))
    return 3 * BATCH * (2 * ((enc + cross_kv) * LI + dec * LT) + attention)


@pytest.mark.parametrize(
    "overrides, k",
    [
        ({}, 1),
        (
            {"router_type": "topk", "num_selected_experts": 2, "logits_via_embedding": False},
            2,
        ),
    ],
)
def test_train_flops_by_hand(overrides, k):
    config = tiny_config(**overrides)
    params = network.init_abstract(config)["params"]
    got = flops.train_flops_per_step(params, config, BATCH, {"inputs": LI, "targets": LT})
    assert got == _by_hand(k)


def test_scanned_layers_count_the_same():
    config = tiny_config()
    lengths = {"inputs": LI, "targets": LT}
    plain = flops.train_flops_per_step(network.init_abstract(config)["params"], config, 2, lengths)
    scanned = dataclasses.replace(config, scan_layers=True)
    params = network.init_abstract(scanned)["params"]
    assert flops.train_flops_per_step(params, scanned, 2, lengths) == plain
