"""The packed T5X encoder-decoder features the input pipeline yields: their one list.

No TensorFlow here: the model, the train step and the planner read these names too.
"""

from __future__ import annotations

# Every feature of a batch (`switch_t5.data.pipeline.InputPipeline`), <int32>[batch, length]
# with length the `inputs` length for `encoder_*` features, else the `targets` length.
FEATURE_KEYS = (
    "encoder_input_tokens",
    "encoder_segment_ids",
    "encoder_positions",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)
# Features only the loss reads (the model never sees them).
LOSS_FEATURES = ("decoder_loss_weights",)
# The model's inputs: the rest.
MODEL_FEATURES = tuple(k for k in FEATURE_KEYS if k not in LOSS_FEATURES)


def length_key(feature: str) -> str:
    """`"inputs"` or `"targets"`: the TASK_FEATURE_LENGTHS entry that gives `feature`'s length."""
    if feature not in FEATURE_KEYS:
        raise KeyError(f"{feature!r} is not a batch feature; known: {', '.join(FEATURE_KEYS)}")
    return "inputs" if feature.startswith("encoder_") else "targets"
