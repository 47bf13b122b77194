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
