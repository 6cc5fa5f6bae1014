"""Moved to :mod:`cstar.files.serialize`; this name keeps working, with a FutureWarning."""

import importlib
import sys
import warnings

warnings.warn("cstar.serialize moved to cstar.files.serialize: import it from there (or the name from cstar)",
              FutureWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("cstar.files.serialize")
