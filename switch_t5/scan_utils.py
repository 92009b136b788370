"""Converting params between the unscanned and the scanned (`nn.scan`) layer layouts.

Unscanned (`SwitchConfig.scan_layers=False`): `{encoder,decoder}/layers_{i}/...`, one subtree per
layer. Scanned: `{encoder,decoder}/layers/subblock_{j}/...` where every leaf has a leading axis of
`num_layers / period` blocks and block b, subblock j is layer `b * period + j`
(`period = config.scan_period(stack)`, one period of the dense/sparse pattern). Everything
outside the layers (embedding, relative position biases, final norms, logits) is shared.

The functions work on plain (unboxed) params trees of numpy or jax arrays, and on any tree laid
out like the params (e.g. gradients). Optimizer states are not converted: start a fresh one, or
convert the params and let training rebuild it (as fine-tuning does).

    params = scan_utils.match_layout(restored_params, config)  # whatever the checkpoint holds
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from switch_t5 import errors
from switch_t5.config import SwitchConfig

STACKS = ("encoder", "decoder")


def _stack(leaves: list[Any]) -> Any:
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def is_scanned(params: Mapping[str, Any]) -> bool:
    """True when the tree holds the scanned layout (`encoder/layers/...`)."""
    for stack in STACKS:
        if stack not in params:
            raise errors.UserError(
                f"params have no {stack!r} subtree (top level: {sorted(params)})"
            )
    return "layers" in params["encoder"]


def scan_params(params: Mapping[str, Any], config: SwitchConfig) -> dict[str, Any]:
    """Unscanned -> scanned layout for `config` (its scan_period decides the blocks).

    Raises:
      ValueError: a layer is missing, or the layers of one subblock position differ in
        structure (the checkpoint was made with another dense/sparse layout).
    """
    out = dict(params)
    for stack in STACKS:
        tree = dict(params[stack])
        n, period = config.num_layers(stack), config.scan_period(stack)
        missing = [i for i in range(n) if f"layers_{i}" not in tree]
        if missing:
            raise errors.UserError(
                f"{stack} has no layers {missing} (found {sorted(k for k in tree if 'layer' in k)}"
                f"); the params are not an unscanned {n}-layer {stack}"
            )
        layers = [tree.pop(f"layers_{i}") for i in range(n)]
        sparse = set(config.sparse_layers(stack))
        for i, layer in enumerate(layers):
            has_experts = "expert" in layer.get("mlp", {})
            if has_experts != (i in sparse):
                raise errors.UserError(
                    f"{stack}/layers_{i} is {'sparse' if has_experts else 'dense'} in the params "
                    f"but {'sparse' if i in sparse else 'dense'} in the config (sparse layers "
                    f"{sorted(sparse)}); convert with the config the params were trained with"
                )
        block = {}
        for j in range(period):
            group = layers[j::period]
            structure = jax.tree.structure(group[0])
            for b, layer in enumerate(group):
                if jax.tree.structure(layer) != structure:
                    raise errors.UserError(
                        f"{stack}/layers_{b * period + j} differs in structure from "
                        f"{stack}/layers_{j}; both must be {'sparse' if j else 'alike'} to share "
                        f"subblock_{j} (scan period {period}) - check the config's sparse layers"
                    )
            block[f"subblock_{j}"] = jax.tree.map(lambda *xs: _stack(list(xs)), *group)
        tree["layers"] = block
        out[stack] = tree
    return out


def unscan_params(params: Mapping[str, Any], config: SwitchConfig) -> dict[str, Any]:
    """Scanned -> unscanned layout (the inverse of `scan_params`).

    Raises:
      ValueError: the blocks do not match `config` (subblock count or number of blocks).
    """
    out = dict(params)
    for stack in STACKS:
        tree = dict(params[stack])
        if "layers" not in tree:
            raise errors.UserError(
                f"{stack} has no scanned 'layers' subtree; is it already unscanned?"
            )
        block = tree.pop("layers")
        n, period = config.num_layers(stack), config.scan_period(stack)
        if sorted(block) != [f"subblock_{j}" for j in range(period)]:
            raise errors.UserError(
                f"{stack}/layers holds {sorted(block)} but the config's scan period is {period} "
                f"(subblock_0 ... subblock_{period - 1}); the params are of another layout"
            )
        n_blocks = n // period
        for j in range(period):
            sub = block[f"subblock_{j}"]
            leads = {x.shape[0] for x in jax.tree.leaves(sub)}
            if leads != {n_blocks}:
                raise errors.UserError(
                    f"{stack}/layers/subblock_{j} has leading (layers) sizes {sorted(leads)}; "
                    f"the config needs {n_blocks} blocks of {period} layers ({n} layers)"
                )
            for b in range(n_blocks):
                tree[f"layers_{b * period + j}"] = jax.tree.map(lambda x, b=b: x[b], sub)
        out[stack] = tree
    return out


def scanned_name(name: str, config: SwitchConfig) -> tuple[str, tuple[int, ...]]:
    """Where the unscanned param (or subtree) `name` lives in the scanned layout of `config`:
    `stack/layers_{i}/rest` -> (`stack/layers/subblock_{i % period}/rest`, (i // period,)), the
    leading (block) index into the stacked array; any other name -> (name, ())."""
    m = re.fullmatch(r"(encoder|decoder)/layers_(\d+)(/.*)?", name)
    if m is None:
        return name, ()
    stack, i, rest = m.group(1), int(m.group(2)), m.group(3) or ""
    block, sub = divmod(i, config.scan_period(stack))
    return f"{stack}/layers/subblock_{sub}{rest}", (block,)


def match_layout(params: Mapping[str, Any], config: SwitchConfig) -> dict[str, Any]:
    """Params in the layout `config.scan_layers` asks for, whichever layout they come in."""
    scanned = is_scanned(params)
    if scanned == config.scan_layers:
        return dict(params)
    return scan_params(params, config) if config.scan_layers else unscan_params(params, config)
