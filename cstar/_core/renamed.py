"""Names changed since release: the old ones keep working, each use noted by a :class:`FutureWarning`.

- ``method`` meant four things (the training attack, the rank allocation, the
  compared approach, the pruning criterion); the training one is now ``attack``
  (``TrainConfig(attack=...)``, ``--attack``, ``attack:`` in a config file or a
  training section).
- What cstar counts are multiply-accumulates, so MACs are called so: the budget
  ``"flops"`` is ``"macs"``, ``flops_ratio`` (the joint budget's MACs target) is
  ``macs_ratio``, :func:`cstar.count_flops` is :func:`cstar.count_macs`.
- A rank plan names its targets and what it reached apart: ``target`` is
  ``target_ratio``, ``flops_target`` ``target_macs_ratio``, ``ratio``
  ``achieved_ratio``, ``flops_ratio`` ``achieved_macs_ratio``.
- The first training phase after the dense model has one name, ``search``
  (compress called its settings ``admm_train`` and its phase ``admm``).

Records that runs wrote before a rename (``config.yaml``, ``plan.json``,
``phases.json`` and a phase's folder, a comparison cell's training record) are
read with the new names, silently.
"""

from __future__ import annotations

import functools
import warnings

from .errors import CstarError

TRAINING = {"method": "attack"}  # old key -> new key, in training settings and the options that hold them
MACS = {"flops_ratio": "macs_ratio"}  # in a rank target (RankSpec, select_ranks)
COMPRESS = {**MACS, "admm_train": "search"}  # in compress's settings (CompressConfig and its from_dict)
SETTINGS = {**TRAINING, **COMPRESS}  # in the command line's options (config files, a run's config.yaml)
PLAN = {"target": "target_ratio", "flops_target": "target_macs_ratio"}  # in a rank plan (plan.json)
PHASES = {"admm": "search"}  # the phases a run records in phases.json
VALUES = {"budget": {"flops": "macs"}}  # old value -> new value, of the settings named
_MEANING = {"attack": "the training attack", "macs_ratio": "the joint budget's MACs target",
            "search": "the first training phase", "macs": "multiply-accumulates"}


def renamed(values: dict, where: str, note: bool = True, names: dict[str, str] = TRAINING) -> dict:
    """``values`` with each old key of ``names`` under its new name, and each old value of :data:`VALUES`
    (e.g. ``budget: flops``) as its new one.

    ``where`` names the source in messages (e.g. ``"the training settings"``).
    ``note``: a :class:`FutureWarning` per renamed key or value (off for records
    that cstar itself wrote). Both names at once is a :class:`CstarError`.
    """
    out = dict(values)
    for old, new in names.items():
        if old not in out:
            continue
        if new in out:
            raise CstarError(f"{where}: both '{old}' and '{new}' are given, and '{old}' is the old name of "
                             f"'{new}'; keep only '{new}'")
        out[new] = out.pop(old)
        if note:
            _warn(f"'{old}' in {where}", new, f"'{new}'")
    for key in VALUES.keys() & out.keys():
        out[key] = renamed_value(out[key], key, where, note)
    return out


def current_options(record: dict) -> dict:
    """A run's recorded options (its ``config.yaml``) in today's names, silently: the options of
    :data:`SETTINGS`, and in each section (a mapping: ``dense``, ``search``...) the training settings'."""
    record = renamed(record, "a run's record", note=False, names=SETTINGS)
    return {key: renamed(value, "a run's record", note=False) if isinstance(value, dict) else value
            for key, value in record.items()}


def renamed_value(value: object, key: str, where: str, note: bool = True) -> object:
    """``value`` of the setting ``key``, its new name when it is an old one of :data:`VALUES` (noted)."""
    new = VALUES.get(key, {}).get(value) if isinstance(value, str) else None
    if new is None:
        return value
    if note:
        _warn(f"{key}={value!r} in {where}", new, f"{key}={new!r}")
    return new


def old_name(old: str, new: str) -> None:
    """Note a use of ``old``, the old name of ``new`` (a function, an option...)."""
    _warn(old, new, new, stacklevel=4)


def old_attribute(owner: str, old: str, new: str) -> property:
    """A read-only property ``owner.old`` that gives ``owner.new``, noted."""
    def get(self):
        _warn(f"{owner}.{old}", new, f"{owner}.{new}", stacklevel=3)
        return getattr(self, new)
    return property(get, doc=f"The old name of :attr:`{new}` (a :class:`FutureWarning`).")


def accepting_old_names(function, names: dict[str, str], where: str):
    """``function`` (e.g. a class's ``__init__``) that also takes the old keyword names of ``names``, noted."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **renamed(kwargs, where, names=names))
    return wrapper


def _warn(old: str, new_key: str, new: str, stacklevel: int = 4) -> None:
    meaning = f" ({_MEANING[new_key]})" if new_key in _MEANING else ""
    warnings.warn(f"{old} is now {new}{meaning}; the old name still works for now", FutureWarning,
                  stacklevel=stacklevel)
