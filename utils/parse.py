"""Parsers of setting values given as text (command-line flags): each says what it wants."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable


def commas_said(*texts: str) -> str:
    """The hint for a comma-separated list read as one value, when a text has a comma: a flag
    taking several values wants them apart ("" otherwise)."""
    return " (several values go separated by spaces, not commas)" * any("," in t for t in texts)


def _number(text: str, kind: type = float):
    """``text`` as an int or a float, or the flag's own one-line refusal (argparse's would name
    the parser function, and a library caller would meet the ValueError of ``int()``)."""
    try:
        return kind(text)
    except ValueError:
        wanted = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}"
                                         + commas_said(text)) from None


def whole_number(text: str) -> int:
    return _number(text, int)


def _in_zero_one(text: str, example: str) -> float:
    """A number in (0, 1]; ``example`` says what a value means for the flag at hand."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}; e.g. {example}")
    return value


def fraction(text: str) -> float:
    return _in_zero_one(text, "0.1 keeps 10%")


def quantile(text: str) -> float:
    return _in_zero_one(text, "0.99 is the 99th percentile")


def holdout_fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}; e.g. 0.1 holds out 10%")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def odd_positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be an odd whole number >= 1 (a neighbourhood "
                                         f"centred on its patch), got {text}; e.g. 3")
    return value


def hierarchy(text: str) -> str:
    """Backbone stages joined by '+', finest first: "2+3" (or "layer2+layer3") -> "2+3"."""
    parts = [part.strip().removeprefix("layer") for part in text.split("+")]
    if not all(part in ("1", "2", "3", "4") for part in parts) or len(set(parts)) < len(parts):
        raise argparse.ArgumentTypeError(f"must be distinct stages 1-4 joined by '+', got "
                                         f"{text}; e.g. 2+3 (PatchCore's) or 1+2+3")
    return "+".join(sorted(parts))


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A parser that accepts exactly one of ``choices``."""
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text}")
        return text
    parse.choices = choices  # what argparse's ``choices`` of the same flag must list
    return parse


def user_path(text: str | os.PathLike) -> Path:
    """A path flag, with ``~`` expanded: the shell leaves it as it is in ``--data-root=~/mvtec``
    and in quotes, and a literal ``~`` folder would be made in the working directory."""
    return Path(text).expanduser()


def flag_names(parser: argparse.ArgumentParser, argv: list[str] = ()) -> dict[str, str]:
    """Setting name (the parser's dest, RunConfig's field) -> its flag, for error messages: the
    one ``argv`` typed where a setting has two (``--seeds 0 0`` is not told of ``--seed``)."""
    typed = {arg.split("=", 1)[0] for arg in argv}
    return {a.dest: next((flag for flag in a.option_strings if flag in typed), a.option_strings[0])
            for a in parser._actions if a.option_strings}
