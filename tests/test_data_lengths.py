"""TASK_FEATURE_LENGTHS validation and span-corruption targets that the lengths would cut."""

import numpy as np
import pytest

from switch_t5.data import lengths
from switch_t5.errors import UserError


@pytest.mark.parametrize(
    ("value", "message"),
    [
        # targets 0 crashed the process (SIGSEGV), -1 ended in a TF graph error.
        ({"inputs": 64, "targets": 0}, r"\['targets'\]=0 must be a positive integer"),
        ({"inputs": 64, "targets": -1}, r"\['targets'\]=-1 must be a positive integer"),
        ({"inputs": 0, "targets": 16}, r"\['inputs'\]=0 must be a positive integer"),
        # 16.5 was silently truncated to 16, 'x' raised int()'s ValueError.
        ({"inputs": 64, "targets": 16.5}, r"\['targets'\]=16.5 is a float; it must be a positive"),
        ({"inputs": "64", "targets": 16}, r"\['inputs'\]='64' is a str; it must be a positive"),
        ({"inputs": 64, "targets": True}, r"\['targets'\]=True is a bool"),
        ({"inputs": 64, "targets": None}, r"\['targets'\]=None is a NoneType"),
        ({"inputs": 64}, r"lacks 'targets'; give exactly the keys 'inputs', 'targets'"),
        ({"inputs": 64, "targets": 16, "target": 4}, r"has unknown key\(s\) 'target'"),
        ({"input": 64, "targets": 16}, r"lacks 'inputs' and has unknown key\(s\) 'input'"),
        ([64, 16], r"TASK_FEATURE_LENGTHS=\[64, 16\] is a list; give a dict"),
    ],
)
def test_bad_feature_lengths_name_key_value_and_what_is_allowed(value, message):
    with pytest.raises(lengths.FeatureLengthsError, match=message) as info:
        lengths.check_feature_lengths(value)
    assert isinstance(info.value, UserError)


def test_good_feature_lengths_become_python_ints():
    got = lengths.check_feature_lengths({"targets": np.int64(8), "inputs": 1})
    assert got == {"inputs": 1, "targets": 8} and type(got["targets"]) is int
    assert list(got) == ["inputs", "targets"]


def test_pipeline_refuses_bad_lengths_before_building_anything():
    from switch_t5.data import pipeline

    # Not even a registered task is needed: nothing is built or looked up first.
    with pytest.raises(lengths.FeatureLengthsError, match=r"\['targets'\]=0"):
        pipeline.InputPipeline("no_such_task", "train", {"inputs": 64, "targets": 0}, 8)


def test_span_corruption_targets_must_fit(tmp_path):
    seqio = pytest.importorskip("seqio")
    from switch_t5.data import span_corruption, tasks, vocab

    spm = vocab.train_sentencepiece(
        [f"word{i % 37} text number {i}" for i in range(300)], str(tmp_path / "s.model"), 160
    )
    source = tasks.tfrecord_text_source({"train": str(tmp_path / "none.tfrecord")})
    tasks.register_span_corruption_task("span_check", source, vocab.get_vocabulary(spm))
    assert span_corruption.span_corruption_lengths(64)[1] == 14
    with pytest.raises(lengths.TargetLengthError) as info:
        tasks.check_lengths("span_check", "train", {"inputs": 64, "targets": 13})
    assert "makes targets of 14 tokens including sentinels and EOS" in str(info.value)
    assert "targets to at least 14" in str(info.value)
    assert tasks.check_lengths("span_check", "train", {"inputs": 64, "targets": 14})
    with pytest.raises(lengths.FeatureLengthsError, match=r"\['inputs'\]=2 is too small for span"):
        seqio.get_mixture_or_task("span_check").get_dataset({"inputs": 2, "targets": 8})
