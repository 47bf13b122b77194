"""Errors that reach the user as one line (main.py prints them without a traceback).

The library speaks of its settings by their names in ``config.RunConfig`` (``k``,
``coreset_fraction``, ``weights``). A message names a setting as ``{name}``: ``str(error)``
shows the bare name, and the command line shows its flag (``--k``, ``--coreset``, ``--weights``)
through ``render``.
"""
from __future__ import annotations

import contextlib
import errno
import re

_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class UserError(Exception):
    """Bad input: the message names the file or setting and says how to fix it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.template = message

    def render(self, names: dict[str, str] | None = None) -> str:
        names = names or {}
        return _PLACEHOLDER.sub(lambda match: names.get(match[1], match[1]), self.template)

    def __str__(self) -> str:
        return self.render()


class DataError(UserError):
    """A data folder, image or mask that cannot be used as it is."""


class SettingError(UserError):
    """A setting whose value cannot work: ``setting`` and ``value`` name it, ``problem`` says why
    and how to fix it (naming other settings as ``{name}``)."""

    def __init__(self, setting: str, value, problem: str):
        self.setting, self.value, self.problem = setting, value, problem
        separator = "" if problem[:1] in ",;:" else " "
        shown = "" if value is None else f" {value}"  # None: a switch, named without a value
        super().__init__(f"{{{setting}}}{shown}{separator}{problem}")

    def __reduce__(self):  # picklable like the built-in exceptions (figure and loader processes)
        return SettingError, (self.setting, self.value, self.problem)


def non_finite(what: str) -> UserError:
    """``what`` (plural) holds NaN or infinity, which no memory or metric can use: the greedy
    coreset would never finish on it, and the metrics would sort it anywhere. Said with the two
    causes a user can change."""
    return UserError(f"{what} hold NaN or infinite values: the backbone's activations overflowed "
                     "(with {precision} fp16, use fp32 or bf16) or its {weights} are broken")


@contextlib.contextmanager
def full_disk_as_error(folder, then: str = ""):
    """A disk (or quota) that fills up mid-run is the machine's state, not a bug: one line naming
    the folder being written, instead of the traceback of whichever writer met it (PIL, OpenCV,
    json). ``then``: what to run once there is space again."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = f" writing {error.filename}" if error.filename else ""
        raise DataError(f"{error.strerror}{written} (the outputs go to {folder}); free some space "
                        f"there, then run the same command{then}") from None
