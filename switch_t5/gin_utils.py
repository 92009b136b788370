"""Gin at the edges: flag parsing and configurable registration for the entry points.

Model, routing and data modules never import gin. Entry points call `parse_flags` and then
`parse_gin`, which registers what gin may configure, parses `--gin_file`s and `--gin.X=value`
bindings (T5X conventions), and turns gin's errors into messages that name the binding.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence

import gin

from switch_t5 import config as config_lib

# The repository's configs/ folder: `--gin_file=configs/models/tiny.gin` works from anywhere.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")

_REGISTERED = False


def register_configurables() -> None:
    """Makes `switch_t5.SwitchConfig` and `switch_t5.InitialCheckpoint` gin-configurable."""
    global _REGISTERED
    if _REGISTERED:
        return
    gin.external_configurable(config_lib.SwitchConfig, name="SwitchConfig", module="switch_t5")
    # Fine-tuning's initial checkpoint (configs/runs/finetune.gin).
    from switch_t5 import init_checkpoint

    gin.external_configurable(
        init_checkpoint.InitialCheckpoint, name="InitialCheckpoint", module="switch_t5"
    )
    _REGISTERED = True


@dataclasses.dataclass
class GinFlags:
    gin_files: list[str]
    gin_bindings: list[str]
    rest: argparse.Namespace


def parse_flags(
    argv: Sequence[str], add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> GinFlags:
    """Parses `--gin_file=F` (repeated), `--gin_bindings=B` and `--gin.NAME=VALUE` flags.

    `--gin.NAME=VALUE` becomes the binding `NAME = VALUE` (T5X's convention); other flags are
    declared by `add_arguments` and returned in `rest`. Unknown flags are an error.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument(
        "--gin_bindings", action="append", default=[], help="gin binding (repeatable)"
    )
    if add_arguments is not None:
        add_arguments(parser)
    bindings: list[str] = []
    other: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--gin."):
            body = arg[len("--gin.") :]
            if "=" in body:
                name, value = body.split("=", 1)
            elif i + 1 < len(args):
                name, value = body, args[i + 1]
                i += 1
            else:
                raise SystemExit(f"error: {arg} needs a value: write --gin.{body}=VALUE")
            bindings.append(f"{name} = {value}")
        else:
            other.append(arg)
        i += 1
    rest = parser.parse_args(other)
    return GinFlags(
        gin_files=list(rest.gin_file), gin_bindings=list(rest.gin_bindings) + bindings, rest=rest
    )


def _resolve_gin_file(path: str) -> str:
    if os.path.exists(path):
        return path
    for base in (REPO_ROOT, CONFIGS_DIR):
        candidate = os.path.join(base, path)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(
        f"gin file {path!r} not found (looked in the current directory and {REPO_ROOT}); "
        f"shipped configs are under {CONFIGS_DIR}"
    )


class GinConfigError(ValueError):
    """A gin file or binding is wrong; the message names it and how to fix it."""


def parse_gin(
    gin_files: Sequence[str], bindings: Sequence[str] = (), *, finalize: bool = True
) -> None:
    """Registers configurables, then parses gin files and bindings (bindings win).

    Each call starts from a clean configuration: an entry point called twice in one process
    (tests, notebooks) must not inherit the previous call's bindings or a locked config.

    Raises:
      GinConfigError: naming the file or binding that gin rejected (unknown configurable or
        parameter, with gin's near matches where it has them; a syntax error).
      FileNotFoundError: for a gin file that does not exist.
    """
    gin.clear_config()
    register_configurables()
    gin.add_config_file_search_path(REPO_ROOT)
    gin.add_config_file_search_path(CONFIGS_DIR)
    files = [os.path.abspath(_resolve_gin_file(f)) for f in gin_files]
    # Shipped files include each other relative to the repository root. gin tries the working
    # directory first and its package-resource reader crashes on `configs/` (a namespace
    # package) before reaching the search paths above, so includes are resolved from the root.
    cwd = os.getcwd()
    try:
        os.chdir(REPO_ROOT)
        with gin.unlock_config():
            for f in files:
                gin.parse_config_file(f)
    except (ValueError, KeyError, SyntaxError) as e:
        raise GinConfigError(f"in gin file {f!r}: {e}") from e
    finally:
        os.chdir(cwd)
    for binding in bindings:
        try:
            with gin.unlock_config():
                gin.parse_config(binding)
        except (ValueError, KeyError, SyntaxError) as e:
            raise GinConfigError(
                f"bad gin binding {binding!r}: {e}. Check the name against the configurable's "
                "signature (python -m switch_t5.train --help lists the common macros)."
            ) from e
    if finalize:
        gin.finalize()


def make_model_config() -> config_lib.SwitchConfig:
    """The SwitchConfig as the parsed gin files and bindings configure it."""
    register_configurables()
    return gin.get_configurable("switch_t5.SwitchConfig")()


def run_console_main(
    main: Callable[[Sequence[str]], object], errors: tuple[type[BaseException], ...]
) -> None:
    """Runs an entry point's `main(sys.argv[1:])` as a command: one of `errors` (a user's
    setting error, whose message names the fix) prints `error: ...` and exits with status 1."""
    logging.basicConfig(level=logging.WARNING)
    try:
        main(sys.argv[1:])
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
