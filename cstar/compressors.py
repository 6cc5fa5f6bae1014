"""Moved to :mod:`cstar.pipeline.compressors`; this name keeps working, with a FutureWarning."""

import importlib
import sys
import warnings

warnings.warn("cstar.compressors moved to cstar.pipeline.compressors: import it from there (or the name from cstar)",
              FutureWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("cstar.pipeline.compressors")
