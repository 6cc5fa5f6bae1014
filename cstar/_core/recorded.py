"""Recorded work against what a resume asks now: one comparison for every record that a resume trusts.

A killed evaluation keeps its counts with the settings they depend on
(``<card>.partial``: the model's weights, the data, the attacks...); a finished
comparison cell keeps the training settings its model was trained with
(``result.json``). A resume reuses such work only when what it asks now is what
was recorded; otherwise it is refused in one line that names what differs.
"""

from __future__ import annotations

from .errors import CstarError


def differences(before: dict, now: dict, labels: dict[str, str] | None = None, prefix: str = "") -> list[str]:
    """The keys whose values differ between ``before`` and ``now`` (missing counts as None), sorted.

    Nested dicts are compared key by key and named with dots (``"search.lr"``);
    a top-level key of ``labels`` is named by its label instead, as one value.
    """
    labels = labels or {}
    keys = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if key in labels:
            keys += [labels[key]] if old != new else []
        elif isinstance(old, dict) and isinstance(new, dict):
            keys += differences(old, new, prefix=f"{prefix}{key}.")
        elif old != new:
            keys.append(f"{prefix}{key}")
    return keys


def check_same(before: dict, now: dict, what: str, fix: str, labels: dict[str, str] | None = None) -> None:
    """Refuse, naming the differences, work recorded with settings ``before`` reused where ``now`` is asked.

    ``what`` says what holds the record (e.g. ``"cell cstar-16x was trained"``);
    ``fix`` what to do instead. Raises :class:`CstarError`:
    ``"<what> with other settings (<keys> differ): <fix>"``.
    """
    differ = differences(before, now, labels)
    if differ:
        raise CstarError(f"{what} with other settings ({', '.join(differ)} differ): {fix}")
