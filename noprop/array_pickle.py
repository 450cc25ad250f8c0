"""Unpickling that admits only plain containers and numpy arrays: the data files noprop reads as
pickles (CIFAR's python batches) cannot run code. `pickle.load` calls whatever function a file
names; this unpickler maps the few names numpy's own array pickles use and refuses the rest."""
from __future__ import annotations

import pickle
from typing import BinaryIO

import numpy as np


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles written by Python 3 store non-empty bytes as _codecs.encode(text, "latin1"); no
    # other codec is needed, and admitting any name would let a file pick an arbitrary codec module.
    if encoding not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r}")
    return text.encode("latin1", errors)


def _numpy_rebuilders() -> dict:
    # The functions numpy's own pickles of arrays, dtypes and scalars name, taken from numpy itself
    # so that both numpy.core (numpy 1) and numpy._core (numpy 2) spellings map to the loaded numpy.
    reconstruct, scalar = np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode,
             ("__builtin__", "bytes"): bytes, ("builtins", "bytes"): bytes}  # protocol 2 spells b"" as bytes()
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return table


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the table (`name`: module.qualname)."""

    def __init__(self, name: str):
        super().__init__(f"refusing to load {name}")
        self.name = name


class _ArrayUnpickler(pickle.Unpickler):
    """Builds lists, dicts, strings, bytes, numbers and numpy arrays; refuses every other global, so a
    file cannot make the loader call os.system, eval or any other function."""

    allowed = _numpy_rebuilders()

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is None:
            raise RefusedGlobal(f"{module}.{name}")
        return found


def load_array_pickle(file: BinaryIO):
    """Unpickle `file` (Python 2 strings read as latin-1, as the CIFAR batches need), admitting only
    plain containers and numpy arrays; any other global raises RefusedGlobal and nothing runs."""
    return _ArrayUnpickler(file, encoding="latin1").load()
