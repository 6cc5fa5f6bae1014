"""Unpickling that can rebuild numpy arrays and plain containers, and nothing else.

The official CIFAR files are pickles; a plain ``pickle.load`` would run any
callable a tampered file names. :func:`safe_load` resolves only the handful of
globals needed to rebuild numpy arrays, so loading a file never runs code.
"""

import codecs
import pickle
from typing import BinaryIO

import numpy as np


def _latin1_encode(text: str, encoding: str) -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles use to store bytes."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_reconstruct = np.array(0).__reduce__()[0]
_frombuffer = np.arange(2).__reduce_ex__(5)[0]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None


def safe_load(f: BinaryIO):
    """Unpickle ``f`` (Python 2 strings stay ``bytes``); only numpy arrays may be rebuilt.

    Raises ``pickle.UnpicklingError`` for a file that names any other global.
    """
    return _NumpyOnlyUnpickler(f, encoding="bytes").load()
