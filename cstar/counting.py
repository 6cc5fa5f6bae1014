"""Moved to :mod:`cstar.evaluation.counting`; this name keeps working, with a FutureWarning."""

import importlib
import sys
import warnings

warnings.warn("cstar.counting moved to cstar.evaluation.counting: import it from there (or the name from cstar)",
              FutureWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("cstar.evaluation.counting")
