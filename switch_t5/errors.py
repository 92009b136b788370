"""The base class of the errors a user fixes by changing a setting, a flag or an input file.

Entry points print such an error as one `error: ...` line (plus indented detail) and exit with
status 2, without a traceback unless `--debug` is given; any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A setting, flag or input is wrong; the message names the problem and the fix.

    A `ValueError` subclass, so callers that already catch `ValueError` keep working.
    """
