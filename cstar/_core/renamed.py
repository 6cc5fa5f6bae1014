"""Names changed since release: the old ones keep working, each use noted by a :class:`FutureWarning`.

``method`` meant four things (the training attack, the rank allocation, the
compared approach, the pruning criterion); the training one is now ``attack``
(``TrainConfig(attack=...)``, ``--attack``, ``attack:`` in a config file or a
training section). Records that runs wrote before the rename (``config.yaml``,
a comparison cell's training record) are read with the new name, silently.
"""

from __future__ import annotations

import warnings

from .errors import CstarError

TRAINING = {"method": "attack"}  # old key -> new key, in training settings and the options that hold them


def renamed(values: dict, where: str, note: bool = True) -> dict:
    """``values`` with each old key of :data:`TRAINING` under its new name.

    ``where`` names the source in messages (e.g. ``"the training settings"``).
    ``note``: a :class:`FutureWarning` per renamed key (off for records that
    cstar itself wrote). Both names at once is a :class:`CstarError`.
    """
    out = dict(values)
    for old, new in TRAINING.items():
        if old not in out:
            continue
        if new in out:
            raise CstarError(f"{where}: both '{old}' and '{new}' are given, and '{old}' is the old name of "
                             f"'{new}'; keep only '{new}'")
        out[new] = out.pop(old)
        if note:
            warnings.warn(f"'{old}' in {where} is now '{new}' (the training attack); '{old}' still works for now",
                          FutureWarning, stacklevel=3)
    return out
