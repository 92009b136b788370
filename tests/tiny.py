"""What many tests share: the tiny network config `tiny_config(**overrides)`, the real train
step of a tiny batch (`tiny_train_step`), a random batch of token ids (`random_batch`), and a
toy train state with the real model's logical param names (`toy_setup`) for the checkpoint
tests.

Odd sizes (embed 8, head_dim 3, mlp 16, 4 experts) so that a swapped axis fails loudly, float32
for exact comparisons. Each test module overrides what it exercises (layers, routing groups,
capacity) and says why next to its overrides.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from switch_t5 import optim, train_state
from switch_t5.config import SwitchConfig

TINY_FIELDS = dict(
    vocab_size=128,
    d_model=8,
    num_heads=2,
    head_dim=3,
    d_ff=16,
    num_encoder_layers=2,
    num_decoder_layers=2,
    num_experts=4,
    dtype="float32",
)

# `switch_t5.train` runs on the embedded corpus (`embedded_span_corruption`, whose vocabulary has
# 4096 ids) with the tiny model: the model fields and the run settings the train tests share.
EMBEDDED_FIELDS = {**TINY_FIELDS, "vocab_size": 4096, "moe_layer_interval": 2, "group_size": 64}
EMBEDDED_RUN = {
    "mixture_or_task_name": "embedded_span_corruption",
    "task_feature_lengths": {"inputs": 32, "targets": 8},
    "batch_size": 8,
    "log_every": 1,
    "progress": "none",
}


def tiny_config(**overrides) -> SwitchConfig:
    """`SwitchConfig(**TINY_FIELDS)` with `overrides` applied (any SwitchConfig field)."""
    return SwitchConfig(**{**TINY_FIELDS, **overrides})


def tiny_train_step(config: SwitchConfig, mesh: Mesh, batch, make_optimizer=None, losses=None):
    """(run, batch on the mesh): `run_builder.build_run`'s train step (the one training runs)
    for a batch with only `batch`'s features; Adafactor on T5's rsqrt schedule and the model's
    loss weights unless given. `run.setup.init_fn()` gives the state."""
    from switch_t5 import run_builder, trainer

    if make_optimizer is None:

        def make_optimizer(specs):
            return optim.make_optimizer("adafactor", optim.rsqrt_schedule(), specs)

    run = run_builder.build_run(
        config,
        mesh,
        make_optimizer,
        losses or trainer.LossConfig().for_model(config),
        batch_keys=tuple(batch),
    )
    return run, {k: jax.device_put(v, run.batch_shardings[k]) for k, v in batch.items()}


class ToyModel(nn.Module):
    """Params with the logical names the real model uses: an expert kernel [4, 8, 16], an
    embedding [vocab, 8] and (with `dense`) a dense kernel [8, 16]. Small train states for the
    checkpoint tests.

    Attributes:
      vocab: rows of the embedding.
      dense: whether to add the dense kernel.
    """

    vocab: int = 128
    dense: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.1)
        wi = self.param(
            "expert_wi", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")), (4, 8, 16)
        )
        emb = self.param(
            "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")), (self.vocab, 8)
        )
        out = jnp.einsum("bd,edf->bef", emb[x], wi).sum()
        if self.dense:
            kernel = nn.with_logical_partitioning(init, ("embed", "mlp"))
            out = out + self.param("dense", kernel, (8, 16)).sum()
        return out


def toy_setup(mesh: Mesh, *, vocab: int = 128, dense: bool = True) -> train_state.StateSetup:
    """The `ToyModel` train state (Adafactor, factored from dim 4) on `mesh`, seed 3."""
    model = ToyModel(vocab, dense)
    return train_state.setup_train_state(
        lambda rng: model.init(rng, jnp.zeros((2,), jnp.int32)),
        lambda specs: optim.make_optimizer(
            "adafactor", optim.rsqrt_schedule(), specs, min_dim_size_to_factor=4
        ),
        mesh,
        seed=3,
    )


def random_batch(seed=0, batch=8, inputs=16, targets=8, *, vocab=(2, 128), ragged=False):
    """A train batch of uniform random token ids in [vocab[0], vocab[1]). `ragged`: each example
    gets a random number (2 .. targets) of real target tokens, the rest padding."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(*vocab, (batch, inputs)).astype(np.int32)
    tgt = rng.integers(*vocab, (batch, targets)).astype(np.int32)
    if ragged:
        lengths = rng.integers(2, targets + 1, batch)
        tgt = np.where(np.arange(targets)[None] < lengths[:, None], tgt, 0).astype(np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": (tgt > 0).astype(np.float32),
    }
