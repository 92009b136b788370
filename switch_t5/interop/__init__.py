"""Checkpoint interop: HF SwitchTransformers and T5X import, HF export, sparse upcycling.

All conversions stream tensors in chunks under a memory budget (`streaming`).
"""

from switch_t5.interop.hf import hf_to_orbax, load_hf, orbax_to_hf
from switch_t5.interop.streaming import DEFAULT_BUDGET_BYTES

__all__ = ["DEFAULT_BUDGET_BYTES", "hf_to_orbax", "load_hf", "orbax_to_hf"]
