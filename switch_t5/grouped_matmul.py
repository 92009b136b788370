"""Dropless grouped matmul in plain JAX: rows sorted by expert, in blocks of one expert each.

The MegaBlocks idea (arXiv 2211.15841) without custom kernels: the (token, choice) rows are sorted
by expert and each expert's rows are padded up to a multiple of `block_size`, so every block of
`block_size` rows belongs to ONE expert (the block -> expert table `block_expert`). A grouped
matmul is then one [block, in] x [in, out] product per block with that block's expert weights,
which does the dense work plus at most E x (block_size - 1) padding rows, on every backend
(`jax.lax.ragged_dot` is a masked dense dot on CPU: about E times the work).

Static shapes: the padded buffer always holds the bound `num_blocks(rows, experts, block_size)`
blocks; only the first `used_blocks` (a traced count) hold rows, the rest are zeros.

Two implementations of `gmm` (forward and backward):
  "loop"    `fori_loop`s over the used blocks only, each step a 2-D matmul of a chunk of one
            expert's consecutive blocks (8, then at most one each of 4, 2, 1 blocks: bigger
            matmuls, same padding) with that expert's weights taken by a dynamic index (no
            gathered copy of the weights); the custom backward loops again, accumulating each
            chunk's weight gradient into its expert's slice of one [experts, in, out] buffer
            (never a [blocks, in, out] tensor). CPU default.
  "batched" one batched einsum over all blocks with the weights gathered per block
            ([blocks, in, out]); a single batched GEMM suits accelerators better than a loop of
            small ones (not measured here: no GPU/TPU at hand).

Einsum legend: n=blocks, b=rows per block, d=in features, f=out features, e=experts,
m=(token, choice) rows, s=padded slots (n * b).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

GMM_IMPLS = ("loop", "batched")


def default_impl() -> str:
    """ "loop" on CPU (measured by scripts/bench_moe.py), "batched" on accelerators."""
    return "loop" if jax.default_backend() == "cpu" else "batched"


def block_rows(rows: int, block_size: int) -> int:
    """The block size actually used: `block_size`, or fewer rows when there are fewer rows."""
    return max(1, min(block_size, rows))


def num_blocks(rows: int, num_experts: int, block_size: int) -> int:
    """Static block count that always fits `rows` rows of `num_experts` experts.

    Each expert with s rows uses ceil(s / block) <= (s + block - 1) / block blocks, so the
    padded total is at most rows + E x (block - 1); and a used block holds at least one row.
    """
    b = block_rows(rows, block_size)
    return max(1, min((rows + num_experts * (b - 1)) // b, rows))


class BlockLayout(NamedTuple):
    """Where each (token, choice) row sits in the padded, expert-sorted buffer.

    Attributes:
      slot_of_row: <int32>[m] padded slot (block * block_size + offset) of every row; a row that
        goes to no expert here (padding, or an expert held elsewhere) points past the buffer.
      row_of_slot: <int32>[s] the row held by every slot; an empty slot points past the rows (m).
      block_expert: <int32>[n] the expert of every block (unused blocks: the last expert).
      used_blocks: <int32>[] blocks that hold rows (the first ones).
      group_sizes: <int32>[experts] rows of each expert.
    """

    slot_of_row: jax.Array
    row_of_slot: jax.Array
    block_expert: jax.Array
    used_blocks: jax.Array
    group_sizes: jax.Array


def block_layout(expert_of_row: jax.Array, num_experts: int, block_size: int) -> BlockLayout:
    """The padded block layout of rows by expert.

    Args:
      expert_of_row: <int32>[m] expert of every row; a value outside [0, num_experts) marks a row
        that is not computed (it gets a zero output).
      num_experts: E.
      block_size: rows per block (capped at m).

    Returns:
      The layout; its buffer has `num_blocks(m, E, block_size)` blocks of `block_rows(m, ...)`.
    """
    (m,) = expert_of_row.shape
    b = block_rows(m, block_size)
    n = num_blocks(m, num_experts, block_size)
    computed = (expert_of_row >= 0) & (expert_of_row < num_experts)
    # Not-computed rows sort last under the sentinel id E.
    ids = jnp.where(computed, expert_of_row, num_experts).astype(jnp.int32)
    group_sizes = jnp.zeros((num_experts + 1,), jnp.int32).at[ids].add(1)[:num_experts]
    blocks_per_expert = (group_sizes + b - 1) // b
    block_end = jnp.cumsum(blocks_per_expert)
    # [E] first row of each expert in the sorted rows and first slot in the padded buffer.
    row_start = jnp.cumsum(group_sizes) - group_sizes
    slot_start = (block_end - blocks_per_expert) * b
    order = jnp.argsort(ids, stable=True)
    sorted_ids = ids[order]
    expert = jnp.minimum(sorted_ids, num_experts - 1)
    rank = jnp.arange(m, dtype=jnp.int32) - row_start[expert]
    slot_sorted = jnp.where(sorted_ids < num_experts, slot_start[expert] + rank, n * b)
    slot_of_row = jnp.zeros((m,), jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
    row_of_slot = (
        jnp.full((n * b,), m, jnp.int32)
        .at[slot_of_row]
        .set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    )
    # [n, E] -> [n]: a block's expert is the number of experts whose blocks end at or before it.
    blocks = jnp.arange(n, dtype=jnp.int32)
    block_expert = jnp.sum(block_end[None, :] <= blocks[:, None], axis=1, dtype=jnp.int32)
    block_expert = jnp.minimum(block_expert, num_experts - 1)
    return BlockLayout(slot_of_row, row_of_slot, block_expert, block_end[-1], group_sizes)


def _take(src: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take(src, idx, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def take_rows(src: jax.Array, idx: jax.Array, readers: jax.Array) -> jax.Array:
    """Row gather whose backward is a gather too (never a scatter-add).

    Args:
      src: [n, d].
      idx: <int32>[m] source row of each output row; >= n gives a zero row.
      readers: <int32>[n, j] the (at most j) output rows that read each source row; >= m marks
        an unused entry.

    Returns:
      [m, d].
    """
    return _take(src, idx)


def _take_rows_fwd(src, idx, readers):
    return _take(src, idx), readers


def _take_rows_bwd(readers, d_out):
    n, j = readers.shape
    # [m, d] -> [n * j, d] -> [n, j, d] -> [n, d]
    d_src = _take(d_out, readers.reshape(n * j)).reshape(n, j, d_out.shape[-1])
    return jnp.sum(d_src, axis=1), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def dispatch_rows(x: jax.Array, layout: BlockLayout, k: int, block: int) -> jax.Array:
    """Token rows into the padded buffer.

    Args:
      x: [tokens, d]; row r = token * k + choice reads token r // k.
      layout: `block_layout` of the tokens * k rows.
      k: choices per token.
      block: rows per block (`block_rows`).

    Returns:
      [n, block, d]; empty slots are zero.
    """
    t, d = x.shape
    # An empty slot (row m = t * k) maps to token t: out of range, zeros.
    token_of_slot = layout.row_of_slot // k
    # [s, d] -> [n, b, d]
    return take_rows(x, token_of_slot, layout.slot_of_row.reshape(t, k)).reshape(-1, block, d)


def combine_rows(y: jax.Array, layout: BlockLayout) -> jax.Array:
    """[n, b, d] padded buffer -> [m, d] rows in (token, choice) order; uncomputed rows are 0."""
    d = y.shape[-1]
    # [n, b, d] -> [s, d] -> [m, d]
    return take_rows(y.reshape(-1, d), layout.slot_of_row, layout.row_of_slot[:, None])


# Chunk sizes of the "loop" implementation, in blocks: each expert's blocks are covered by
# chunks of 8 blocks, then at most one chunk of 4, 2 and 1 (the binary digits of the rest).
# Bigger matmuls run closer to the dense MLP's speed on CPU than a loop of single blocks, while
# the padding stays that of one block per expert.
CHUNK_BLOCKS = (8, 4, 2, 1)


class _Chunks(NamedTuple):
    """Per chunk size: <int32>[cap] first block and expert of each chunk, <int32>[] count."""

    starts: tuple[jax.Array, ...]
    experts: tuple[jax.Array, ...]
    counts: tuple[jax.Array, ...]


def _chunk_sizes(n: int) -> tuple[int, ...]:
    return tuple(c for c in CHUNK_BLOCKS if c <= n) or (1,)


def _chunks(block_expert: jax.Array, used_blocks: jax.Array, num_experts: int) -> _Chunks:
    """Covers each expert's (contiguous) blocks by chunks of `_chunk_sizes` blocks."""
    (n,) = block_expert.shape
    sizes = _chunk_sizes(n)
    used = jnp.arange(n) < used_blocks
    ids = jnp.where(used, block_expert, num_experts)
    # [E] blocks of each expert and its first block.
    blocks = jnp.zeros((num_experts + 1,), jnp.int32).at[ids].add(1)[:num_experts]
    first = jnp.cumsum(blocks) - blocks
    top = sizes[0]
    full, rest = blocks // top, blocks % top
    # Chunks of the top size: chunk c belongs to the expert whose range of them holds c.
    cap = n // top
    end = jnp.cumsum(full)
    c = jnp.arange(cap, dtype=jnp.int32)
    expert = jnp.minimum(
        jnp.sum(end[None, :] <= c[:, None], axis=1, dtype=jnp.int32), num_experts - 1
    )
    starts = [first[expert] + top * (c - (end - full)[expert])]
    experts, counts = [expert], [end[-1]]
    for size in sizes[1:]:
        # At most one chunk of each smaller size per expert: the binary digits of the rest.
        has = (rest & size) != 0
        begin = first + top * full + (rest // (2 * size)) * (2 * size)
        order = jnp.argsort(~has, stable=True)[: min(num_experts, n // size)]
        starts.append(begin[order].astype(jnp.int32))
        experts.append(order.astype(jnp.int32))
        counts.append(jnp.sum(has, dtype=jnp.int32))
    return _Chunks(tuple(starts), tuple(experts), tuple(counts))


def _loop_fwd_products(x, w, chunks):
    n, b, d = x.shape
    xf = x.reshape(n * b, d)
    y = jnp.zeros((n * b, w.shape[-1]), x.dtype)
    for size, starts, experts, count in zip(_chunk_sizes(n), *chunks):

        def body(i, y, size=size, starts=starts, experts=experts):
            row = starts[i] * b
            xs = jax.lax.dynamic_slice_in_dim(xf, row, size * b)
            w_e = jax.lax.dynamic_index_in_dim(w, experts[i], keepdims=False)
            # [size * b, d] x [d, f] -> [size * b, f]
            return jax.lax.dynamic_update_slice_in_dim(y, xs @ w_e, row, 0)

        y = jax.lax.fori_loop(0, count, body, y)
    return y.reshape(n, b, -1)


@jax.custom_vjp
def _gmm_loop(x, w, block_expert, used_blocks):
    chunks = _chunks(block_expert, used_blocks, w.shape[0])
    return _loop_fwd_products(x, w, chunks)


def _gmm_loop_fwd(x, w, block_expert, used_blocks):
    chunks = _chunks(block_expert, used_blocks, w.shape[0])
    return _loop_fwd_products(x, w, chunks), (x, w, chunks)


def _gmm_loop_bwd(res, dy):
    x, w, chunks = res
    n, b, d = x.shape
    xf = x.reshape(n * b, d)
    dyf = dy.astype(x.dtype).reshape(n * b, -1)
    # The weight gradient accumulates in float32 over an expert's chunks (bf16 would round
    # every partial sum), in its own slice of one [E, d, f] buffer.
    carry = (jnp.zeros_like(xf), jnp.zeros(w.shape, jnp.float32))
    for size, starts, experts, count in zip(_chunk_sizes(n), *chunks):

        def body(i, carry, size=size, starts=starts, experts=experts):
            dx, dw = carry
            row, e = starts[i] * b, experts[i]
            xs = jax.lax.dynamic_slice_in_dim(xf, row, size * b)
            dys = jax.lax.dynamic_slice_in_dim(dyf, row, size * b)
            w_e = jax.lax.dynamic_index_in_dim(w, e, keepdims=False)
            # [rows, f] x [d, f] -> [rows, d]
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dys @ w_e.T, row, 0)
            # [rows, d] x [rows, f] -> [d, f], added into expert e's slice only.
            dw_e = jax.lax.dynamic_index_in_dim(dw, e, keepdims=False)
            dw_e = dw_e + jnp.matmul(xs.T, dys, preferred_element_type=jnp.float32)
            return dx, jax.lax.dynamic_update_index_in_dim(dw, dw_e, e, 0)

        carry = jax.lax.fori_loop(0, count, body, carry)
    dx, dw = carry
    return dx.reshape(x.shape), dw.astype(w.dtype), None, None


_gmm_loop.defvjp(_gmm_loop_fwd, _gmm_loop_bwd)


def _gmm_batched(x, w, block_expert, used_blocks):
    n = x.shape[0]
    used = (jnp.arange(n) < used_blocks)[:, None, None]
    # [n, b, d] x [n, d, f] -> [n, b, f]; the weights gathered per block.
    y = jnp.einsum("nbd,ndf->nbf", x, w[block_expert].astype(x.dtype))
    return jnp.where(used, y, 0).astype(x.dtype)


def gmm(
    x: jax.Array,
    w: jax.Array,
    block_expert: jax.Array,
    used_blocks: jax.Array,
    impl: str = "loop",
) -> jax.Array:
    """Grouped matmul over expert blocks: y[i] = x[i] @ w[block_expert[i]] for the used blocks.

    Args:
      x: <dtype>[n, b, d] padded rows, sorted by expert in blocks of b.
      w: [experts, d, f] weights (cast to x's dtype for the products).
      block_expert: <int32>[n] the expert of every block.
      used_blocks: <int32>[] blocks that hold rows; later blocks give zeros.
      impl: "loop" or "batched" (see the module docstring).

    Returns:
      <dtype>[n, b, f].
    """
    if impl == "loop":
        return _gmm_loop(x, w.astype(x.dtype), block_expert, used_blocks)
    if impl == "batched":
        return _gmm_batched(x, w, block_expert, used_blocks)
    raise ValueError(f"gmm impl={impl!r}: use one of {GMM_IMPLS}")
