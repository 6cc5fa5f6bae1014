"""Moved to :mod:`cstar.training.fit`; this name keeps working, with a FutureWarning."""

import importlib
import sys
import warnings

warnings.warn("cstar.train moved to cstar.training.fit: import it from there (or the name from cstar)",
              FutureWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("cstar.training.fit")
