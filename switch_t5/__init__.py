"""switch_t5: Switch Transformer (sparse Mixture-of-Experts T5) models in JAX/Flax."""

__version__ = "0.1.0"
