"""What travels between the launcher and the ranks: plain data only, read back without running any code.

The keyword arguments go to every rank in ``kwargs.pt`` and each rank's return value comes back in
``rank{r}.result.pt``, both written with ``torch.save``. Both are read with ``torch.load(weights_only=True)``:
containers (dict, list, tuple, set), numbers, strings, bytes, None, tensors, torch dtypes/devices/sizes and numpy
arrays, scalars and dtypes (:data:`NUMPY_GLOBALS`, allowed only while loading). No other class or function named
in a file is looked up, so a run folder copied from elsewhere (or a file planted in one) cannot run code when it
is read; it gives one error instead.

Both sides check before they write: :func:`kwargs_bytes` refuses a keyword argument that could not be loaded
(a function, an open file, an object of some class) before any folder or process exists, naming it;
:func:`result_bytes` turns such a return value into the rank's error.

Lesson: notebook 00, section 2 ("Ranks report in").
"""

from __future__ import annotations

import io
import re
import types

import numpy as np
import torch

__all__ = ["NUMPY_GLOBALS", "PLAIN", "dumps", "loads", "refusal", "describe", "find_unsendable", "kwargs_bytes",
           "result_bytes"]

PLAIN = "numbers, strings, lists, dicts, tensors"  # the short list the errors give

_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2 names it numpy._core, numpy 1 numpy.core
# What a pickled numpy array, scalar or dtype names: the array rebuilder, the scalar constructor, the classes.
NUMPY_GLOBALS = [_NP_CORE.multiarray._reconstruct, _NP_CORE.multiarray.scalar, np.ndarray, np.dtype,
                 *sorted({type(np.dtype(t)) for t in np.sctypeDict.values()}, key=str)]
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes)  # exactly these: an IntEnum is an int too
_PLAIN_CLASSES = (torch.Tensor, torch.dtype, torch.device, np.generic)


def dumps(obj) -> bytes:
    """``torch.save`` of ``obj`` into bytes (raises what pickling raises)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(data, map_location=None):
    """``torch.load(weights_only=True)`` of bytes or a path, numpy's arrays, scalars and dtypes allowed."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with torch.serialization.safe_globals(NUMPY_GLOBALS):
        return torch.load(src, map_location=map_location, weights_only=True)


def refusal(data, error: BaseException) -> str:
    """Why ``loads(data)`` failed, in one line, without torch's advice to load the file the unsafe way."""
    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(src)
    except Exception:  # noqa: BLE001 — not a torch.save file at all: say what torch said
        names = []
    if names:
        return f"it refers to {', '.join(names)}, which is not plain data; nothing in it was run"
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(error), re.S)
    text = found.group(1) if found else (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{type(error).__name__}: {' '.join(text.split())}"


def describe(obj) -> str:
    """'a function', 'an open file', 'a pathlib.PosixPath', ...: what an object is, for an error message."""
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)) or (
            callable(obj) and type(obj).__name__ == "partial"):
        return "a function"
    if isinstance(obj, type):
        return "a class"
    if isinstance(obj, io.IOBase):
        return "an open file"
    if isinstance(obj, types.ModuleType):
        return "a module"
    if isinstance(obj, types.GeneratorType):
        return "a generator"
    t = type(obj)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _sendable(obj) -> bool:
    if type(obj) in _PLAIN_TYPES or isinstance(obj, _PLAIN_CLASSES) or (
            isinstance(obj, np.ndarray) and obj.dtype != object):
        return True
    try:
        loads(dumps(obj))
        return True
    except Exception:  # noqa: BLE001 — any failure to pickle or to load: not sendable
        return False


def find_unsendable(obj, path: str = "", depth: int = 0):
    """(path, object) of the first part of ``obj`` that could not travel (``"['a'][0]"``; ``""``: obj itself);
    None when all of it can."""
    if isinstance(obj, (dict, list, tuple, set)) and depth < 32:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, item in items:
            if isinstance(obj, dict) and not _sendable(key):
                return f"{path}[key {key!r}]", key
            hit = find_unsendable(item, f"{path}{{...}}" if isinstance(obj, set) else f"{path}[{key!r}]", depth + 1)
            if hit is not None:
                return hit
    return None if _sendable(obj) else (path, obj)


def _what(obj) -> str:
    """'a function', or 'a dict holding a function at ['f']' for a part of a container."""
    hit = find_unsendable(obj)
    if hit is None or not hit[0]:
        return describe(obj)
    return f"{describe(obj)} holding {describe(hit[1])} at {hit[0]}"


def kwargs_bytes(kwargs: dict, label: str = "keyword argument") -> bytes:
    """The ``torch.save`` bytes of ``kwargs``, checked to load as plain data; one ValueError naming the first
    argument that cannot (``label`` names what it is: a keyword argument, a ``--push`` variable)."""
    try:
        data = dumps(kwargs)
        loads(data)
        return data
    except Exception as e:  # noqa: BLE001 — find the argument to blame
        error = e
    for name, value in kwargs.items():
        if not _sendable(value):
            raise ValueError(f"{label} {name!r} ({_what(value)}) cannot be sent to the ranks: pass plain data — "
                             f"{PLAIN} — or a module:function name") from None
    raise ValueError(f"the {label}s cannot be sent to the ranks ({type(error).__name__}: {error}): pass plain "
                     f"data — {PLAIN} — or a module:function name") from None


def result_bytes(value, target: str):
    """(bytes for ``rank{r}.result.pt``, None), or (the bytes of None, a TypeError saying why ``value`` cannot
    go back to the launcher)."""
    try:
        data = dumps(value)
        loads(data)
        return data, None
    except Exception:  # noqa: BLE001 — say which part, then report None
        pass
    hit = find_unsendable(value) or ("", value)
    return dumps(None), TypeError(
        f"the return value of {target} cannot be sent back to the launcher: value{hit[0]} is "
        f"{describe(hit[1])}, which the launcher does not unpickle (so that a run folder cannot run code). Return "
        f"plain data: {PLAIN}, tuples, sets, numpy arrays (e.g. dataclasses.asdict(x) for a dataclass, "
        "x._asdict() for a namedtuple)")
