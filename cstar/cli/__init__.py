"""The ``cstar`` command line.

One module per concern, read in this order:

- :mod:`._parser`: the commands and their options (``build_parser``), no behaviour;
- :mod:`._options`: where every option gets its value (``parse_args``): built-in
  default < the dataset's preset for the device < ``--config`` (or the record of a
  resumed run) < flags, with section options merged key by key;
- :mod:`._inputs`: the data, models and checkpoints a command starts from, each
  checked before any work is done;
- :mod:`._runs`: devices, run directories and the files that record a run;
- :mod:`._commands`: one function per command, each a short script over the above;
- :mod:`._main`: ``main``, which turns every :class:`cstar.CstarError` into one line
  and exit code 2.
"""

from ._main import main
from ._options import parse_args
from ._parser import build_parser, parse_eps

__all__ = ["build_parser", "main", "parse_args", "parse_eps"]
