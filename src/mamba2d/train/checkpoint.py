"""Checkpoints and result files, written atomically and read back safely.

Every file goes to a temporary name in the same folder, is flushed to disk, and is renamed over
the target, so a killed run leaves either the old file or the new one, never half of one.
Checkpoints are read with ``torch.load(weights_only=True)``: only tensors and plain containers,
never arbitrary pickled objects.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, strict JSON: NaN and infinities (an undefined metric)
    are written as null, since JSON has no literal for them."""
    return write_text(path, json.dumps(_finite(obj), indent=1, default=_json_default, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (numpy scalars and arrays included)."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically save a checkpoint dict of tensors, numbers, strings, lists and dicts."""
    return atomic_write(path, lambda p: torch.save(state, p))


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects.

    torch's warning about a foreign pickle protocol is silenced: the file is refused or read safely
    either way, and the caller reports which."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def describe_load_error(err: Exception) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: refused pickles are named as such."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        return ("not a readable weights-only torch file: corrupt, or pickled Python objects, which are never "
                "unpickled (torch.load weights_only=True)")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"not a readable torch file ({type(err).__name__}: {first})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Raises ValueError naming the file when it is missing, truncated or not a safe checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = safe_torch_load(path, map_location)
    except Exception as err:
        raise ValueError(f"{path}: {describe_load_error(err)}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(state).__name__}")
    return state
