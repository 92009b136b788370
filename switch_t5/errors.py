"""The base class of the errors a user fixes by changing a setting, a flag or an input file.

Entry points print such an error as one `error: ...` line (plus indented detail) and exit with
status 2, without a traceback unless `--debug` is given; any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """A setting, flag or input is wrong; the message names the problem and the fix.

    A `ValueError` subclass, so callers that already catch `ValueError` keep working.
    """


# Type checks the self-validating configs share. `True` is an `int` in Python, so a bool given
# where a number belongs (`--gin.train.b1=True`) must be refused explicitly.


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
