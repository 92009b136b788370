"""Gin at the edges: flag parsing and configurable registration for the entry points.

Model, routing and data modules never import gin. Entry points call `parse_flags` and then
`parse_gin`, which registers what gin may configure, parses `--gin_file`s and `--gin.X=value`
bindings (T5X conventions), and turns gin's errors into messages that name the binding.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

import gin

from switch_t5 import config as config_lib
from switch_t5 import console, errors

# The repository's configs/ folder: `--gin_file=configs/models/tiny.gin` works from anywhere.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")

_REGISTERED = False


def register_configurables() -> None:
    """Makes every configurable of the entry points known to gin, whichever command parses.

    `switch_t5.SwitchConfig` and `switch_t5.InitialCheckpoint`, plus the configurables of
    train, eval, infer and the data pipeline: a run's config.gin (with its `train.*` bindings)
    must load in eval, infer and plan too, and its macros count as used there.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    # `python -m switch_t5.eval` runs eval as `__main__`; importing `switch_t5.eval` again (train
    # imports it) would register its configurables a second time, which gin refuses.
    main_module = sys.modules.get("__main__")
    main_name = getattr(getattr(main_module, "__spec__", None), "name", "")
    if main_name.startswith("switch_t5."):
        sys.modules.setdefault(main_name, main_module)
    # Imported here: these modules import this one.
    import switch_t5.data_gin
    import switch_t5.eval
    import switch_t5.infer
    import switch_t5.train  # noqa: F401
    from switch_t5 import init_checkpoint

    gin.external_configurable(config_lib.SwitchConfig, name="SwitchConfig", module="switch_t5")
    # Fine-tuning's initial checkpoint (configs/runs/finetune.gin).
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
    declared by `add_arguments` and returned in `rest`. `--debug` (see `run_console_main`) is
    accepted by every entry point. Unknown flags are an error.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument(
        "--gin_bindings", action="append", default=[], help="gin binding (repeatable)"
    )
    add_debug_flag(parser)
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
                raise GinConfigError(f"{arg} needs a value: write --gin.{body}=VALUE")
            bindings.append(f"{name} = {value}")
        else:
            other.append(arg)
        i += 1
    rest = parser.parse_args(other)
    return GinFlags(
        gin_files=list(rest.gin_file), gin_bindings=list(rest.gin_bindings) + bindings, rest=rest
    )


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug`: show the traceback of a setting error; `--verbose`: keep the log lines of
    TensorFlow, XLA, absl and orbax (`run_console_main`)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on a setting error, show the Python traceback instead of one error line",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the log lines of TensorFlow, XLA, absl and orbax (hidden by default)",
    )


# Libraries whose INFO/WARNING log lines are noise on the console (uncached datasets, missing
# checkpoint metadata, no GPU found); their errors still show, and so do switch_t5's warnings.
QUIET_LOGGERS = ("absl", "tensorflow", "orbax", "jax._src.xla_bridge")


def configure_console_logging(verbose: bool = False) -> None:
    """Hides the library log noise of a command unless `verbose`.

    Sets TF_CPP_MIN_LOG_LEVEL=3 (TensorFlow's and XLA's C++ `I0000 ... cudart_stub` and
    `E0000 ... cuInit` lines; read when they log first, so this runs before a command touches
    TensorFlow or a JAX backend) unless the environment sets it, and raises the Python loggers
    of `QUIET_LOGGERS` to ERROR. Real errors are exceptions and still print.
    """
    logging.basicConfig(level=logging.WARNING)
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    console.quiet_native_logs()


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


# A gin `import NAME` line imports a Python module (e.g. one registering a user task).
_IMPORT_FIX = (
    "\n(a gin `import` line needs the module on the Python path: add its folder to PYTHONPATH)"
)


class GinConfigError(errors.UserError):
    """A gin file or binding is wrong; the message names it and how to fix it."""


def parse_gin(
    gin_files: Sequence[str], bindings: Sequence[str] = (), *, finalize: bool = True
) -> None:
    """Registers configurables, then parses gin files and bindings (bindings win).

    Each call starts from a clean configuration: an entry point called twice in one process
    (tests, notebooks) must not inherit the previous call's bindings or a locked config.

    Raises:
      GinConfigError: naming the file or binding that gin rejected (unknown configurable or
        parameter, with gin's near matches where it has them; a syntax error; a string value
        without quotes), or a macro that nothing uses (`check_macros_used`).
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
    referenced: set[str] = set()
    with _recording_macro_references(referenced):
        try:
            os.chdir(REPO_ROOT)
            with gin.unlock_config():
                for f in files:
                    gin.parse_config_file(f)
        except (ValueError, KeyError, SyntaxError) as e:
            raise GinConfigError(f"in gin file {f!r}: {e}") from e
        except ImportError as e:  # an `import my_tasks` line
            raise GinConfigError(f"in gin file {f!r}: {e}{_IMPORT_FIX}") from e
        finally:
            os.chdir(cwd)
        from_files = set(defined_macros())
        for binding in bindings:
            try:
                with gin.unlock_config():
                    gin.parse_config(binding)
            except (ValueError, KeyError, SyntaxError) as e:
                raise GinConfigError(_binding_error(binding, e)) from e
            except ImportError as e:
                raise GinConfigError(f"bad gin binding {binding!r}: {e}{_IMPORT_FIX}") from e
    check_macros_used(from_files, referenced)
    if finalize:
        finalize_config()


def _binding_error(binding: str, error: BaseException) -> str:
    """The message for a binding gin rejected: gin's first line, and the quoted form of a bare
    string value (`--gin.MODEL_DIR=/tmp/x` reaches gin as `MODEL_DIR = /tmp/x`, not a value)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    name, sep, value = (part.strip() for part in binding.partition("="))
    if sep and value and value[0] not in "'\"[{(%@-." and not value[0].isdigit():
        return (
            f"bad gin binding {binding!r}: {value} is not a gin value; a string needs quotes "
            f'that survive the shell: --gin.{name}="{value!r}" (in a gin file or '
            f"--gin_bindings: {name} = {value!r})"
        )
    suggestion = _parameter_suggestion(reason)
    if suggestion:
        return f"bad gin binding {binding!r}: {reason} {suggestion}"
    return (
        f"bad gin binding {binding!r}: {reason} Check the name against the configurable's "
        "signature (python -m switch_t5.train --help lists the common macros)."
    )


def _parameter_suggestion(reason: str) -> str | None:
    """'Did you mean batch_size?' for gin's "doesn't have a parameter named 'batch_sizee'"."""
    m = re.match(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", reason)
    if not m:
        return None
    try:
        configurable = gin.config._REGISTRY.get_match(m.group(1))
        names = list(inspect.signature(configurable.wrapped).parameters)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    close = difflib.get_close_matches(m.group(2), names, n=1, cutoff=0.6)
    if close:
        return f"Did you mean {m.group(1)}.{close[0]}?"
    return f"Its parameters: {', '.join(names)}."


def defined_macros() -> list[str]:
    """The macros (`NAME = value`) of the parsed configuration."""
    return [scope for scope, selector in gin.config._CONFIG if selector == "gin.macro"]


def _macro_references(config: Any) -> set[str]:
    """The macros `%NAME` in gin values (nested in lists, tuples and dicts too)."""
    return {
        ref.config_key[0]
        for ref in gin.config.iterate_references(config)
        if ref.config_key[1] == "gin.macro"
    }


@contextlib.contextmanager
def _recording_macro_references(referenced: set[str]):
    """Adds to `referenced` the macros of every value gin binds while parsing, including values
    a later file or flag overrides: `--gin.switch_t5.SwitchConfig.num_experts=16` replaces
    `num_experts = %NUM_EXPERTS`, and the model gin's NUM_EXPERTS is not a mistake."""
    original = gin.config.bind_parameter

    def bind_parameter(binding_key, value):
        referenced.update(_macro_references({"binding": {"value": value}}))
        return original(binding_key, value)

    # gin's parser calls its module-level bind_parameter for every statement.
    gin.config.bind_parameter = bind_parameter
    try:
        yield
    finally:
        gin.config.bind_parameter = original


def used_macros(referenced: Collection[str] = ()) -> set[str]:
    """Macros a binding or another macro references (`%NAME`, nested in lists and dicts too),
    whether or not this command calls the configurable, plus `referenced` (macros of values
    overridden while parsing) and the macros library code reads by name
    (`switch_t5.data_gin.MACROS`)."""
    from switch_t5 import data_gin

    return set(data_gin.MACROS) | set(referenced) | _macro_references(gin.config._CONFIG)


def check_macros_used(from_files: Collection[str] = (), referenced: Collection[str] = ()) -> None:
    """Raises GinConfigError naming each macro that nothing uses, with the closest used one.

    A misspelt macro (`--gin.TRAIN_STEP=3`) would otherwise be ignored without a word and the
    run would use the value of the macro the user meant to set.

    Args:
      from_files: macros the gin files define (the rest came from bindings), for the message.
      referenced: macros referenced by values bound while parsing and overridden since.
    """
    used = used_macros(referenced)
    unused = [name for name in defined_macros() if name not in used]
    if not unused:
        return
    lines = []
    for name in unused:
        where = "in a gin file" if name in from_files else "on the command line"
        close = difflib.get_close_matches(name, sorted(used), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        lines.append(f"{name} is set {where} but no binding uses it{hint}")
    if len(lines) == 1:
        raise GinConfigError(
            f"gin macro {lines[0]} (its value would be ignored: fix the name or remove it)"
        )
    raise GinConfigError(
        f"{len(lines)} gin macros are set but unused (their values would be ignored: fix the "
        "names or remove them):\n" + "\n".join(f"  {line}" for line in lines)
    )


def finalize_config() -> None:
    """`gin.finalize()`, its errors (a macro left at %gin.REQUIRED) as GinConfigError."""
    try:
        gin.finalize()
    except ValueError as e:
        m = re.match(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", str(e))
        if m:
            name = m.group(1)
            raise GinConfigError(
                f"gin macro {name} is required but not set: pass --gin.{name}=... "
                f"(or set `{name} = ...` in a gin file)"
            ) from e
        raise GinConfigError(f"gin configuration: {e}") from e


def make_model_config() -> config_lib.SwitchConfig:
    """The SwitchConfig as the parsed gin files and bindings configure it."""
    register_configurables()
    return gin.get_configurable("switch_t5.SwitchConfig")()


def model_overrides() -> dict[str, Any]:
    """The `switch_t5.SwitchConfig.*` fields the parsed gin sets explicitly."""
    register_configurables()
    return dict(gin.get_bindings("switch_t5.SwitchConfig"))


def format_error(error: BaseException) -> str:
    """`error: ...` for a setting error: its first line, then its other lines indented, without
    gin's `In call to configurable 'x' (<function ...>)` context lines."""
    lines = [
        line.rstrip()
        for line in str(error).splitlines()
        if line.strip() and not _GIN_CALL_CONTEXT.match(line)
    ]
    if not lines:
        lines = [type(error).__name__]
    return "\n".join([f"error: {lines[0]}", *(f"  {line.lstrip()}" for line in lines[1:])])


_GIN_CALL_CONTEXT = re.compile(r"^\s*In call to configurable '[^']*' \(.*\)\s*$")


def run_console_main(
    main: Callable[[Sequence[str]], object], errors_: tuple[type[BaseException], ...] = ()
) -> None:
    """Runs an entry point's `main(sys.argv[1:])` as a command.

    A setting error (`switch_t5.errors.UserError`, `FileNotFoundError` or one of `errors_`,
    whose message names the fix) prints one `error: ...` line (plus indented detail lines) and
    exits with status 2; with `--debug` it keeps its traceback. Any other exception is a bug and
    keeps its traceback. Library log noise is hidden unless `--verbose`
    (`configure_console_logging`).
    """
    argv = sys.argv[1:]
    configure_console_logging(verbose="--verbose" in argv)
    try:
        main(argv)
    except (errors.UserError, FileNotFoundError, *errors_) as e:
        if "--debug" in argv:
            raise
        print(format_error(e), file=sys.stderr)
        sys.exit(2)
