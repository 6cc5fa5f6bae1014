"""``cstar``'s entry point: parse, dispatch, and turn every :class:`CstarError` into one line."""

from __future__ import annotations

import os
import sys
import warnings

from .. import distributed
from .._core.errors import CstarError
from ..files.run_dirs import release_run_dirs
from .._core.signals import Interrupted
from ._commands import COMMANDS
from ._options import parse_args
from ._runs import device


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code
    (0 done, 2 bad input with one line on stderr, 130/143 interrupted)."""
    stdout = sys.stdout
    try:
        args = parse_args(argv)
        # under torchrun (WORLD_SIZE > 1): join the process group; only rank 0 prints and warns
        distributed.init_from_env(device(getattr(args, "device", None) or "cpu"))
        with warnings.catch_warnings():
            if not distributed.is_main():
                sys.stdout = open(os.devnull, "w")
                warnings.simplefilter("ignore")  # every rank runs the same code: rank 0 has the same warnings
            return COMMANDS[args.command](args)
    except CstarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        release_run_dirs()  # the run's directory is free for the next run
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
