"""Reading numpy-array pickles (the Mini-ImageNet caches) without running code from the file.

A pickle can call any importable function. This unpickler resolves only the few globals numpy
arrays and scalars pickle to (numpy 1.x and 2.x names, protocols 2 to 5) and refuses the rest.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from imaml_cli.errors import UserError

try:  # numpy >= 2 moved its internals; pickles name either module
    from numpy._core import multiarray, numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray, numeric


class _NDArray:
    """Stands in for ``numpy.ndarray``, which array pickles only hand to ``_reconstruct``."""


def _reconstruct(cls, shape, dtype):
    if cls is not _NDArray:
        raise pickle.UnpicklingError("_reconstruct may only build numpy.ndarray")
    return multiarray._reconstruct(np.ndarray, shape, dtype)


def _encode(text, encoding="latin1"):
    # Protocol 2 stores bytes as _codecs.encode(str, "latin1"); no other codec is needed.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return text.encode("latin1")


_ALLOWED = {("numpy", "ndarray"): _NDArray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _encode}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = multiarray.scalar
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = numeric._frombuffer


class _Refused(pickle.UnpicklingError):
    pass


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def load(path: Path) -> object:
    """Unpickle ``path``; a UserError names the file if it needs anything beyond numpy data."""
    try:
        with open(path, "rb") as f:
            # latin1 turns Python 2 byte strings back into the bytes numpy stored.
            return _Unpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise UserError(f"{path} asks to load {exc}, which a dataset pickle never needs; "
                        f"refusing it (unpickling it could run code); recreate the file") from None
    except Exception as exc:  # whatever the damage, the file is unusable
        raise UserError(f"cannot read {path} ({type(exc).__name__}: {exc}); the file is damaged "
                        f"or not a pickle, recreate it") from exc
