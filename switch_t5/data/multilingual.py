"""Multilingual pretraining data: mC4's languages, mT5's language sampling, per-language files.

mT5 (arXiv 2010.11934 sec. 2.2) samples each language L of a mixture with probability
p(L) ~ n(L)^alpha, n(L) the number of training documents of L, alpha = 0.3: low-resource
languages are seen far more often than their share of the data (alpha 1 is proportional sampling,
alpha -> 0 uniform). The Switch Transformer's mSwitch experiments (arXiv 2101.03961 sec. 5.2)
pretrain on the same mixture: mC4's 101 languages, 107 tasks with the six romanised variants.

Here, TensorFlow-free (the seqio tasks live in `switch_t5.data.multilingual_tasks`):

- `MC4_LANGUAGES`: the one list of mC4's languages (TFDS `c4/multilingual` split names).
- `sampling_rates(counts, alpha)`: the mixture's probabilities.
- `read_counts(path)`: the per-language document-count file, a JSON object
  `{"en": 3928733374, "de": 414552842, ...}` (language -> training documents, positive integers;
  extra languages are ignored). `python -m switch_t5.data.multilingual` writes one from files.
- `language_patterns(spec, languages)`: a file mapping, either `{language: glob or [globs]}` or
  one glob template with `{lang}` (`/data/mc4/c4-{lang}.tfrecord-*.json.gz`, the layout of the
  released multilingual C4 JSON files, allenai/c4 `multilingual/`).

Errors a user fixes (a bad alpha, a language with no count, a bad mapping or count file) are
`MultilingualError`s, one line naming the setting and the fix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from switch_t5 import errors
from switch_t5.data import readers

MC4_TASK = "mc4_span_corruption"
# mT5's vocabulary: 250,000 SentencePiece pieces + 100 extra ids = 250,100 (embeddings 250,112).
MC4_VOCABULARY_PATH = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"
# The version mT5 pretrained on (multilingual_t5/tasks.py); 3.1.0 is a later rebuild.
MC4_TFDS_NAME = "c4/multilingual:3.0.1"
DEFAULT_ALPHA = 0.3
# mC4's 101 languages (mT5 paper, Table 6) as TFDS `c4/multilingual` names its splits, with the
# six romanised variants (`-Latn`) mT5 and mSwitch train on as tasks of their own: 107 tasks.
MC4_LANGUAGES = (
    *("af", "am", "ar", "az", "be", "bg", "bg-Latn", "bn", "ca", "ceb", "co", "cs", "cy", "da"),
    *("de", "el", "el-Latn", "en", "eo", "es", "et", "eu", "fa", "fi", "fil", "fr", "fy", "ga"),
    *("gd", "gl", "gu", "ha", "haw", "hi", "hi-Latn", "hmn", "ht", "hu", "hy", "id", "ig", "is"),
    *("it", "iw", "ja", "ja-Latn", "jv", "ka", "kk", "km", "kn", "ko", "ku", "ky", "la", "lb"),
    *("lo", "lt", "lv", "mg", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "no"),
    *("ny", "pa", "pl", "ps", "pt", "ro", "ru", "ru-Latn", "sd", "si", "sk", "sl", "sm", "sn"),
    *("so", "sq", "sr", "st", "su", "sv", "sw", "ta", "te", "tg", "th", "tr", "uk", "ur", "uz"),
    *("vi", "xh", "yi", "yo", "zh", "zh-Latn", "zu"),
)
# mC4 also has pages of no identified language ("und"): a split, not one of the 101 languages.
MC4_UNDETERMINED = "und"
_LANGUAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")


class MultilingualError(errors.UserError):
    """A bad multilingual data setting: alpha, languages, file mapping or count file."""


class MultilingualFileNotFoundError(MultilingualError, FileNotFoundError):
    """A language's glob matches no file (also a FileNotFoundError)."""


def language_task_name(mixture: str, language: str) -> str:
    """The task of one language: `mc4_span_corruption.ru_Latn` (seqio names allow no `-`)."""
    return f"{mixture}.{language.replace('-', '_')}"


def check_alpha(alpha: Any, what: str = "MC4_ALPHA") -> float:
    """`alpha` as a float, or a MultilingualError unless it is a finite number > 0."""
    if not errors.is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise MultilingualError(
            f"{what}={alpha!r} must be a number > 0: languages are sampled with p(L) ~ "
            f"n(L)^alpha (mT5's {DEFAULT_ALPHA}; 1.0 is proportional to the documents)"
        )
    return float(alpha)


def check_language(language: Any, what: str) -> str:
    if not isinstance(language, str) or not _LANGUAGE.match(language):
        raise MultilingualError(
            f"{what}: language {language!r} must be a name of letters, digits, '-' or '_' "
            "(e.g. 'en', 'ru-Latn')"
        )
    return language


def check_mc4_languages(languages: Any, what: str = "MC4_LANGUAGES") -> tuple[str, ...]:
    """The mC4 languages asked for (None: all of `MC4_LANGUAGES`), each checked."""
    if languages is None:
        return MC4_LANGUAGES
    if isinstance(languages, str) or not isinstance(languages, Sequence) or not languages:
        raise MultilingualError(
            f"{what}={languages!r} must be a non-empty list of mC4 languages, e.g. ['en', 'de']"
        )
    known = (*MC4_LANGUAGES, MC4_UNDETERMINED)
    for language in languages:
        if language not in known:
            raise MultilingualError(
                f"{what}: {language!r} is not an mC4 language; use names from "
                f"switch_t5.data.multilingual.MC4_LANGUAGES ({', '.join(MC4_LANGUAGES)}) or "
                f"{MC4_UNDETERMINED!r}"
            )
    if len(set(languages)) != len(languages):
        raise MultilingualError(f"{what}={list(languages)!r} names a language twice")
    return tuple(languages)


def sampling_rates(counts: Mapping[str, int], alpha: float) -> dict[str, float]:
    """mT5's language sampling: p(L) = n(L)^alpha / sum_K n(K)^alpha, in the order of `counts`.

    Raises:
      MultilingualError: alpha <= 0, no language, or a count that is not a positive integer.
    """
    alpha = check_alpha(alpha)
    if not counts:
        raise MultilingualError("no language to sample: give at least one language")
    for language, n in counts.items():
        if not errors.is_int(n) or n <= 0:
            raise MultilingualError(
                f"language {language!r} has document count {n!r}; counts must be positive "
                "integers (leave out a language with no documents)"
            )
    # Logs first: n^alpha of mC4's largest languages (~4e9 documents) is fine in float64, but
    # n^alpha with a large alpha is not.
    logs = {language: alpha * math.log(n) for language, n in counts.items()}
    top = max(logs.values())
    weights = {language: math.exp(v - top) for language, v in logs.items()}
    total = sum(weights.values())
    return {language: w / total for language, w in weights.items()}


def read_counts(path: str) -> dict[str, int]:
    """The per-language document-count file (module docstring): `{language: documents}`.

    Raises:
      MultilingualError: the file is missing or is not such a JSON object.
    """
    fix = (
        'a JSON object {"en": 3928733374, "de": 414552842, ...} of training documents per '
        "language; `python -m switch_t5.data.multilingual --files=TEMPLATE --output=PATH` "
        "counts them"
    )
    try:
        with open(os.path.expanduser(path)) as f:
            counts = json.load(f)
    except FileNotFoundError:
        raise MultilingualError(
            f"MC4_COUNTS file {path!r} does not exist; it must be {fix}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MultilingualError(
            f"MC4_COUNTS file {path!r} is unreadable ({e}); it must be {fix}"
        ) from None
    if not isinstance(counts, dict):
        raise MultilingualError(
            f"MC4_COUNTS file {path!r} holds a {type(counts).__name__}; it must be {fix}"
        )
    return counts


def counts_for(languages: Sequence[str], counts: Mapping[str, Any], source: str) -> dict[str, int]:
    """The counts of `languages`, in their order; a MultilingualError names the first missing."""
    missing = [language for language in languages if language not in counts]
    if missing:
        raise MultilingualError(
            f"{source} has no document count for {missing[0]!r} ({len(missing)} of "
            f"{len(languages)} languages missing: {', '.join(missing[:10])}); add "
            f'"{missing[0]}": <training documents> to it, or leave the language out '
            "(MC4_LANGUAGES)"
        )
    return {language: counts[language] for language in languages}


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def language_patterns(
    spec: Any, languages: Sequence[str] | None, what: str
) -> dict[str, list[str]]:
    """A file mapping as `{language: [globs]}`.

    Args:
      spec: `{language: glob or [globs]}`, or a glob template with `{lang}`.
      languages: the languages a template is expanded for; with a dict, None keeps its keys
        and a sequence picks those keys (each must be there).
      what: the setting's name, for errors.

    Raises:
      MultilingualError: another kind of value, a bad language, or a language not mapped.
    """
    if isinstance(spec, str):
        if "{lang}" not in spec:
            raise MultilingualError(
                f"{what}={spec!r}: give a glob template with {{lang}} (e.g. "
                "'/data/mc4/c4-{lang}.tfrecord-*.json.gz') or a mapping {language: glob}"
            )
        if languages is None:
            raise MultilingualError(f"{what}={spec!r}: a template needs a list of languages")
        return {language: [spec.replace("{lang}", language)] for language in languages}
    if not isinstance(spec, Mapping) or not spec:
        raise MultilingualError(
            f"{what} must be a mapping {{language: glob or [globs]}} or a glob template with "
            f"{{lang}}, not {spec!r}"
        )
    patterns = {}
    for language, globs in spec.items():
        check_language(language, what)
        globs = [globs] if isinstance(globs, str) else globs
        if not isinstance(globs, Sequence) or not globs or not all(map(_is_str, globs)):
            raise MultilingualError(
                f"{what}[{language!r}]={globs!r} must be a glob or a non-empty list of globs"
            )
        patterns[language] = list(globs)
    if languages is None:
        return patterns
    missing = [language for language in languages if language not in patterns]
    if missing:
        raise MultilingualError(
            f"{what} maps no files for {missing[0]!r} ({', '.join(missing[:10])}); add it, or "
            "leave the language out (MC4_LANGUAGES)"
        )
    return {language: patterns[language] for language in languages}


def count_documents(patterns: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Documents per language of local files (formats of `switch_t5.data.readers`)."""
    counts = {}
    for language, globs in patterns.items():
        stats = readers.ReadStats()
        files = readers.resolve_files(list(globs), what=f"files of {language!r}")
        for _ in readers.iter_documents(files, "line", stats):
            pass
        counts[language] = stats.documents
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the per-language document-count file (MC4_COUNTS) of local files."
    )
    parser.add_argument("--files", required=True, help="glob template with {lang}")
    parser.add_argument("--languages", default=None, help="comma-separated (default: mC4's)")
    parser.add_argument("--output", required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    languages = check_mc4_languages(args.languages.split(",") if args.languages else None)
    counts = count_documents(language_patterns(args.files, languages, "--files"))
    with open(args.output, "w") as f:
        json.dump(counts, f, indent=1)
    print(
        f"wrote {args.output}: {sum(counts.values())} documents in {len(counts)} languages",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
