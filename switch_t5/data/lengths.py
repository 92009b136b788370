"""Feature lengths and whether targets fit them: checked before any data is built.

seqio trims each feature to its length and appends EOS after the cut (`append_eos_after_trim`),
so a target longer than `targets - 1` tokens silently loses its end. For a classification task
that is a silent wrong result: the model learns the cut label perfectly (token accuracy 1.0) and
decoding never produces a whole label (decode accuracy 0). So:

- `check_feature_lengths` (the one home of what a valid `TASK_FEATURE_LENGTHS` is): a mapping of
  exactly `inputs` and `targets` to positive integers; anything else is a `FeatureLengthsError`
  naming the key, the value and what is allowed, before TensorFlow builds anything (a targets
  length of 0 used to crash the process).
- `check_labels_fit`: every label string of a classification task must fit, EOS included
  (a 4-token label needs targets >= 5); else a `TargetLengthError` naming the label, its token
  count and the length to set.
- `check_targets_fit`: free-text targets are scanned (the first `DEFAULT_TARGET_SCAN_EXAMPLES`
  examples of the split); any that would be cut is a `TargetLengthError` with the count, the
  longest one and the length to set.

The tasks of this package run these checks whenever a dataset is requested
(`switch_t5.data.tasks.LengthCheckedTask`), so training, evaluation and `data.show` all refuse
lengths that would cut a target. No TensorFlow here (entry points import it at start-up).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from switch_t5.errors import UserError

FEATURE_KEYS = ("inputs", "targets")
# Free-text targets: how many examples of a split are tokenized to find targets that would be
# cut (about 0.1 s for 1000 short targets); 0 skips the scan.
DEFAULT_TARGET_SCAN_EXAMPLES = 1000
_EXAMPLE = "{'inputs': 512, 'targets': 114}"


class FeatureLengthsError(UserError):
    """TASK_FEATURE_LENGTHS is not a mapping of `inputs` and `targets` to positive integers."""


class TargetLengthError(UserError):
    """A label or target is longer than the targets feature length (it would be cut).

    Attributes:
      needed: the smallest targets length that fits (EOS included).
    """

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


def check_feature_lengths(
    lengths: Any, what: str = "TASK_FEATURE_LENGTHS", keys: Sequence[str] = FEATURE_KEYS
) -> dict[str, int]:
    """Returns `lengths` as a `{key: int}` dict, or raises FeatureLengthsError.

    Args:
      lengths: e.g. {"inputs": 512, "targets": 114}.
      what: the setting's name in messages (the gin macro, or a flag).
      keys: the keys required, no more and no fewer.

    Raises:
      FeatureLengthsError: not a mapping, a missing or extra key, a value that is not an
        integer (floats, strings and booleans included) or is below 1.
    """
    if not isinstance(lengths, Mapping):
        raise FeatureLengthsError(
            f"{what}={lengths!r} is a {type(lengths).__name__}; give a dict of positive "
            f"integers such as {_EXAMPLE}"
        )
    missing = [k for k in keys if k not in lengths]
    extra = [k for k in lengths if k not in keys]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"lacks {', '.join(map(repr, missing))}")
        if extra:
            problems.append(f"has unknown key(s) {', '.join(map(repr, extra))}")
        raise FeatureLengthsError(
            f"{what}={dict(lengths)!r} {' and '.join(problems)}; give exactly the keys "
            f"{', '.join(map(repr, keys))}, e.g. {_EXAMPLE}"
        )
    out = {}
    for key in keys:
        value = lengths[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise FeatureLengthsError(
                f"{what}[{key!r}]={value!r} is a {type(value).__name__}; it must be a positive "
                f"integer (tokens, EOS included), e.g. {_EXAMPLE}"
            )
        if value < 1:
            raise FeatureLengthsError(
                f"{what}[{key!r}]={value} must be a positive integer (tokens, EOS included); "
                f"e.g. {_EXAMPLE}"
            )
        out[key] = int(value)
    return out


def combine_target_errors(
    errors: Sequence[TargetLengthError], lengths: Mapping[str, int], mixture: str
) -> TargetLengthError:
    """One error for the members of a mixture whose targets do not fit (needed: the largest)."""
    if len(errors) == 1:
        return errors[0]
    needed = max(e.needed for e in errors)
    details = "\n".join(f"  {e}" for e in errors)
    return TargetLengthError(
        f"mixture {mixture!r}: the targets of {len(errors)} of its tasks would be cut; "
        f"{_set_hint('TASK_FEATURE_LENGTHS', lengths, needed)}:\n{details}",
        needed,
    )


def token_count(vocabulary: Any, text: str, add_eos: bool = True) -> int:
    """Tokens of `text` in `vocabulary`, plus one for the EOS seqio appends."""
    return len(vocabulary.encode(text)) + int(add_eos)


def _set_hint(what: str, lengths: Mapping[str, int], needed: int) -> str:
    fixed = {**lengths, "targets": needed}
    return f"set {what} targets to at least {needed}, e.g. {what}={fixed!r}"


def check_labels_fit(
    labels: Iterable[str],
    vocabulary: Any,
    lengths: Mapping[str, int],
    task: str,
    add_eos: bool = True,
    what: str = "TASK_FEATURE_LENGTHS",
) -> None:
    """Raises TargetLengthError unless every label fits the targets length, EOS included."""
    limit = lengths["targets"]
    counts = {label: token_count(vocabulary, label, add_eos) for label in labels}
    too_long = {label: n for label, n in counts.items() if n > limit}
    if not too_long:
        return
    eos = " including EOS" if add_eos else ""
    names = ", ".join(f"{label!r} is {n} tokens{eos}" for label, n in too_long.items())
    needed = max(too_long.values())
    raise TargetLengthError(
        f"task {task!r}: {what} targets={limit} is too short for its label(s): {names} (seqio "
        f"appends EOS, so a label of k tokens needs targets >= k + 1); such labels would be cut "
        f"and never predicted whole; {_set_hint(what, lengths, needed)}",
        needed,
    )


def check_targets_fit(
    targets: Iterable[str],
    vocabulary: Any,
    lengths: Mapping[str, int],
    task: str,
    split: str,
    max_examples: int = DEFAULT_TARGET_SCAN_EXAMPLES,
    add_eos: bool = True,
    what: str = "TASK_FEATURE_LENGTHS",
    skip_hint: str = "",
) -> None:
    """Scans the first `max_examples` free-text targets; raises TargetLengthError if any is cut.

    Args:
      targets: the split's target strings in order (only the first `max_examples` are read).
      vocabulary: the targets' vocabulary.
      lengths: validated feature lengths.
      task, split: named in the message.
      max_examples: how many targets to tokenize (0: no scan).
      add_eos: whether seqio appends EOS to targets.
      what: the setting's name in messages.
      skip_hint: how to turn the scan off, appended to the message.
    """
    if max_examples <= 0:
        return
    limit = lengths["targets"]
    scanned = cut = 0
    longest, longest_text = 0, ""
    for text in targets:
        if scanned >= max_examples:
            break
        scanned += 1
        n = token_count(vocabulary, text, add_eos)
        if n > limit:
            cut += 1
        if n > longest:
            longest, longest_text = n, text
    if not cut:
        return
    shown = longest_text if len(longest_text) <= 60 else longest_text[:57] + "..."
    eos = " including EOS" if add_eos else ""
    which = f"first {scanned}" if scanned == max_examples else f"{scanned}"
    raise TargetLengthError(
        f"task {task!r}: {cut} of the {which} {split!r} examples have targets longer than "
        f"{what} targets={limit} and would be cut; the longest is {longest} tokens{eos} "
        f"({shown!r}); {_set_hint(what, lengths, longest)}"
        + (f" ({skip_hint})" if skip_hint else ""),
        longest,
    )
