"""The one exception type for bad user input.

Every check of a user-supplied value (a name, a path, a number, a config key)
raises :class:`CstarError` with a single-line message that names the problem
and the fix. The CLI prints it as ``error: <message>`` and exits with code 2,
so users never see a traceback from deep inside torch.
"""


class CstarError(ValueError):
    """Bad user input: the message names the problem and how to fix it."""


def check_options(values: dict, valid, what: str) -> None:
    """Raise :class:`CstarError` naming any key of ``values`` not in ``valid``."""
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise CstarError(f"unknown {what} option(s) {', '.join(unknown)}: valid options are {', '.join(sorted(valid))}")
