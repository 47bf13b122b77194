"""The methods a run can use, by name: one line here adds a method (its file holds the rest)."""
from models.padim import PaDiM
from models.patchcore import PatchCore
from models.sa_patchcore import SAPatchCore
from models.spade import SPADE

METHODS = {"patchcore": PatchCore, "sa_patchcore": SAPatchCore, "spade": SPADE, "padim": PaDiM}


def method_settings() -> dict[str, list]:
    """Every setting name -> the ``Setting`` of each method that takes it (several share ``k``)."""
    by_name: dict[str, list] = {}
    for method in METHODS.values():
        for setting in method.settings:
            by_name.setdefault(setting.name, []).append(setting)
    return by_name


def setting_help(name: str) -> str:
    """--help for one setting: the methods that take it, grouped by what the setting means to
    them, each group with its defaults (``--k``: PatchCore's and SPADE's k differ in meaning)."""
    by_meaning: dict[str, list[str]] = {}
    for method, model in METHODS.items():
        for setting in model.settings:
            if setting.name == name:
                by_meaning.setdefault(setting.help, []).append(method)
    parts = []
    for meaning, methods in by_meaning.items():
        defaults = [METHODS[m].defaults()[name] for m in methods]
        shown = ["off" if value is None else str(value) for value in defaults]
        default = shown[0] if len(set(shown)) == 1 else \
            ", ".join(f"{m} {value}" for m, value in zip(methods, shown))
        stated = "(default" in meaning  # a default the help explains itself is not repeated
        parts.append(f"{', '.join(methods)}: {meaning}" + ("" if stated else
                                                          f" (default {default})"))
    return "; ".join(parts)
