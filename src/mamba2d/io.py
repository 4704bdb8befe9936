"""Files written atomically and read back safely: text, JSON, HDF5 and checkpoints.

The ground floor of the package: every layer writes its files through :func:`atomic_write`.

* Atomic: the content goes to a temporary file in the target's folder, is flushed to disk
  (``fsync``) and renamed over the target (``os.replace``), so a killed process leaves either the
  old file or the new one, never half of one, and a reader never sees a partial file.
* Permissions as for any new file: the temporary file is created with mode 0o666, which the
  kernel narrows by the process umask (and the folder's default ACL), so with umask 022 files come
  out ``-rw-r--r--`` and lab-mates can read features, checkpoints and tables.
  (``tempfile.mkstemp`` would create it 0600 and the rename would keep that.)
* JSON is strict: NaN and infinities are written as ``null``, so every JSON parser reads the files.
* Checkpoints are read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and
  dicts only, never arbitrary pickled objects.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # h5py and torch load only when a function needs them
    import h5py
    import torch

__all__ = ["CheckpointError", "JSONFileError", "atomic_write", "describe_load_error", "load_checkpoint",
           "read_json", "safe_torch_load", "save_checkpoint", "to_json_value", "write_bytes", "write_h5",
           "write_json", "write_text"]

_TEMP_TRIES = 100


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or not a safe mamba2d checkpoint."""


class JSONFileError(ValueError):
    """A JSON file that is missing or not valid JSON."""


def _create_temp(folder: Path, name: str) -> Path:
    """A new empty file ``.<name>.<random>.tmp`` in ``folder``, created with mode 0o666 & ~umask."""
    for _ in range(_TEMP_TRIES):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            # O_EXCL: never reuse a file another writer created; 0o666: the kernel applies the umask.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{folder}: could not create a temporary file for {name}")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (Linux, macOS); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a fresh temporary file beside ``path``, then rename it onto
    ``path``. ``write`` may open the file by name in any mode (it exists and is empty). Creates the
    parent folders. On any error the temporary file is removed and an existing ``path`` is left as it
    was. Returns ``path`` as a Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, path.name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def to_json_value(obj: Any) -> Any:
    """``obj`` with every value JSON can hold exactly: NaN and +-inf become None, numpy scalars and
    arrays and torch tensors become Python numbers and lists, tuples become lists, paths strings.

    Raises TypeError naming the type of anything else.
    """
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {_json_key(k): to_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_value(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return to_json_value(obj.tolist())
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _json_key(key: Any) -> str | int | float | bool | None:
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    if hasattr(key, "item"):  # numpy integer keys
        return key.item()
    if isinstance(key, os.PathLike):
        return os.fspath(key)
    raise TypeError(f"cannot write a {type(key).__name__} key to JSON")


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """Atomically write ``obj`` as strict JSON (see :func:`to_json_value`: NaN and infinities are
    written as ``null``), ending with a newline."""
    text = json.dumps(to_json_value(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return write_text(path, text + "\n")


def read_json(path: str | Path, *, null_as_nan: bool = False) -> Any:
    """The JSON value in ``path``. ``null_as_nan``: read every ``null`` as ``float("nan")``, the
    inverse of :func:`write_json` for files whose nulls can only be missing numbers (metric tables).

    Raises :class:`JSONFileError` naming the file when it is missing or not JSON.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise JSONFileError(f"{path}: no such file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise JSONFileError(f"{path}: unreadable ({err})") from err
    try:
        obj = json.loads(text)
    except ValueError as err:
        raise JSONFileError(f"{path}: not valid JSON ({err})") from err
    return _nulls_to_nan(obj) if null_as_nan else obj


def _nulls_to_nan(obj: Any) -> Any:
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: _nulls_to_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nulls_to_nan(v) for v in obj]
    return obj


def write_h5(path: str | Path, fill: Callable[[h5py.File], None]) -> Path:
    """Atomically write an HDF5 file: ``fill(f)`` adds datasets and attributes to the open file."""
    import h5py

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            fill(f)

    return atomic_write(path, write)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Atomically save a checkpoint dict of tensors, numbers, strings, lists and dicts.

    Equal states give byte-identical files: ``torch.save`` is handed an open file, so the archive's
    inner folder is not named after the (random) temporary file.
    """
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(dict(state), fh)

    return atomic_write(path, write)


def safe_torch_load(path: str | Path, map_location: str | torch.device | None = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects.

    torch's warning about a foreign pickle protocol is silenced: the file is refused or read safely
    either way, and the caller reports which."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def describe_load_error(err: Exception) -> str:
    """One line for a failed :func:`safe_torch_load`: refused pickles are named as such."""
    if isinstance(err, pickle.UnpicklingError):
        return ("not a readable weights-only torch file: corrupt, or pickled Python objects, which are never "
                "unpickled (torch.load weights_only=True)")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"not a readable torch file ({type(err).__name__}: {first})"


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """A checkpoint dict written by :func:`save_checkpoint`, read with ``weights_only=True``.

    Raises :class:`CheckpointError` (a ValueError) with one line naming the file when it is missing,
    truncated or corrupt, holds pickled Python objects other than tensors and plain containers, or
    is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = safe_torch_load(path, map_location)
    except pickle.UnpicklingError as err:
        # torch's message spans many lines; keep only the name of the refused class, if given.
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects"
            + (f" ({found.group(1)})" if found else "")
            + ", which are never unpickled (checkpoints are read with torch.load weights_only=True: "
            "tensors, numbers, strings, lists and dicts only)") from err
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                              f"{type(err).__name__})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(state).__name__}")
    return state
