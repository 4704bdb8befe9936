"""Feature bags: one slide's patch features and level-0 patch coordinates, read from disk.

Accepted layouts (see ``docs/data-formats.md``):

* CLAM ``h5_files/<slide>.h5`` (``extract_features_fp.py``): datasets ``features`` (N, D) and
  ``coords`` (N, 2) with no attributes; the patch size comes from the patches h5 that
  ``create_patches_fp.py`` wrote (``patches/<slide>.h5``, whose ``coords`` carries ``patch_size``,
  ``patch_level`` and ``downsample``), found beside the features folder or given as a folder.
* TRIDENT ``features_<encoder>/<slide>.h5``: the same datasets; ``coords`` carries
  ``patch_size_level0`` (and ``patch_size``, ``level0_magnification``, ``target_magnification``,
  ``overlap``) itself; TRIDENT's own ``patches/<slide>_patches.h5`` is also found.
* CLAM ``pt_files/<slide>.pt`` (an (N, D) tensor) with coordinates from the patches h5.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from mamba2d.mil.grid import GridError, PatchGrid, Snap, patch_grid

__all__ = [
    "Bag", "BagError", "BagSetReport", "FeatureBagSet", "GridCheck", "SLIDE_EXTENSIONS", "discover_slides",
    "read_bag", "slide_stem",
]

#: Whole-slide image extensions stripped from slide names, so ``x.svs``, ``x`` and ``x.SVS`` agree.
SLIDE_EXTENSIONS: tuple[str, ...] = (
    ".ome.tiff", ".ome.tif",  # before .tif/.tiff, so the whole double suffix goes
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vsi", ".czi", ".bif", ".dcm",
)

_H5_SUFFIXES = (".h5", ".hdf5")
#: Features beyond this magnitude overflow float32 and bfloat16 arithmetic (squares, sums) in the
#: models; no encoder writes them, so they mean a broken file.
MAX_ABS_FEATURE = 1e6
_PT_SUFFIXES = (".pt", ".pth")


class BagError(ValueError):
    """A feature bag (or its coordinates file) is missing, unreadable or inconsistent."""


def slide_stem(name: str | Path) -> str:
    """The slide's id as used everywhere in mamba2d: its file name without a slide extension.

    Only the known slide extensions in :data:`SLIDE_EXTENSIONS` are stripped (case-insensitively):
    TCGA ids hold dots (``TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF-...``) that are part of the id.
    A leading directory is dropped, so a column of slide paths also works.
    """
    text = str(name).strip()
    # Split on both separators: label CSVs written on Windows hold backslash paths.
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    lower = text.lower()
    for ext in SLIDE_EXTENSIONS:
        if lower.endswith(ext) and len(text) > len(ext):
            return text[: -len(ext)]
    return text


@dataclass(frozen=True, eq=False)
class Bag:
    """One slide's bag of patch features.

    ``features``: (N, D) float32. ``coords``: (N, 2) int64 level-0 pixel (x, y) of each patch's
    top-left corner, x (column direction) first. ``patch_size_level0``: the patch side in level-0
    pixels, or None when neither the file nor the caller gave it (2DMambaMIL needs it; the other
    models do not). ``overlap_level0``: how far neighbouring patches overlap, in level-0 pixels
    (TRIDENT's ``overlap``; 0 for CLAM). ``path``: the features file. ``size_source``: the file the
    patch size was read from, when it is not ``path``.
    """

    slide_id: str
    features: torch.Tensor
    coords: torch.Tensor
    patch_size_level0: int | None
    path: Path
    overlap_level0: int = 0
    size_source: Path | None = None

    @property
    def n_patches(self) -> int:
        """N, the number of patches."""
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        """D, the feature width."""
        return int(self.features.shape[1])

    def grid(self, snap: Snap = "auto", max_cells: int | None = None) -> PatchGrid:
        """The patches' tight grid (see :func:`mamba2d.mil.grid.patch_grid`): the lattice step is the
        patch size minus the overlap. Errors are :class:`BagError` naming the file."""
        if self.patch_size_level0 is None:
            raise BagError(f"{self.path}: coords: no patch size (no 'patch_size_level0' or CLAM 'patch_size' "
                           f"attributes, and no patches h5 beside the features folder); pass --patch-size, "
                           f"or --patches-dir with CLAM's patches/ folder")
        step = self.patch_size_level0 - self.overlap_level0
        try:
            return patch_grid(self.coords, step, snap=snap, name=str(self.path), overlap=self.overlap_level0,
                              max_cells=max_cells)
        except GridError as exc:
            raise BagError(str(exc)) from exc


# --------------------------------------------------------------------------------------------------
# Reading one file


def _attr_float(attrs: Any, key: str, where: Path) -> float | None:
    """An h5 attribute as one float (the first element of an array), or None when absent."""
    if key not in attrs:
        return None
    raw = np.asarray(attrs[key]).reshape(-1)
    try:
        value = float(raw[0])
    except (IndexError, TypeError, ValueError) as exc:
        raise BagError(f"{where}: coords attribute {key!r} is not a number: {attrs[key]!r}") from exc
    if not np.isfinite(value) or value <= 0:
        # patch_level 0 is legitimate; every other attribute used here must be positive.
        if not (key == "patch_level" and value == 0):
            raise BagError(f"{where}: coords attribute {key!r} must be a positive number, got {value}")
    return value


def _patch_size_from_attrs(attrs: Any, where: Path) -> tuple[int | None, int]:
    """Level-0 patch side and overlap in pixels from the ``coords`` attributes; (None, 0) when they
    can't tell.

    TRIDENT writes ``patch_size_level0`` and ``overlap`` (at the target magnification, scaled here by
    patch_size_level0 / patch_size). CLAM writes ``patch_size`` at ``patch_level`` and the per-level
    ``downsample`` (dx, dy), so level 0 spans patch_size * dx pixels. Without a downsample,
    ``patch_level`` 0 means the patch size is already level 0; TRIDENT files without
    ``patch_size_level0`` can still scale by ``level0_magnification / target_magnification``.
    """
    size0: int | None = None
    size = _attr_float(attrs, "patch_size", where)
    direct = _attr_float(attrs, "patch_size_level0", where)
    if direct is not None:
        size0 = int(round(direct))
    elif size is not None:
        downsample = _attr_float(attrs, "downsample", where)
        mag0 = _attr_float(attrs, "level0_magnification", where)
        target = _attr_float(attrs, "target_magnification", where)
        if downsample is not None:
            size0 = int(round(size * downsample))
        elif _attr_float(attrs, "patch_level", where) == 0:
            size0 = int(round(size))
        elif mag0 is not None and target is not None:
            size0 = int(round(size * mag0 / target))
    overlap0 = 0
    if size0 is not None and "overlap" in attrs:
        raw = np.asarray(attrs["overlap"]).reshape(-1)
        try:
            overlap = float(raw[0])
        except (IndexError, TypeError, ValueError) as exc:
            raise BagError(f"{where}: coords attribute 'overlap' is not a number: "
                           f"{attrs['overlap']!r}") from exc
        scale = size0 / size if size else 1.0
        overlap0 = int(round(overlap * scale))
        if not np.isfinite(overlap) or overlap < 0 or overlap0 >= size0:
            raise BagError(f"{where}: coords attribute 'overlap' must be in [0, patch size), got {overlap}")
    return size0, overlap0


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise BagError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise BagError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from exc


def _dataset(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
        found = ", ".join(sorted(f.keys())) or "nothing"
        raise BagError(f"{path}: no {key!r} dataset; the file holds: {found}")
    return obj


def _squeeze_lead(arr: np.ndarray, width: int | None, what: str, path: Path) -> np.ndarray:
    """(1, N, W) -> (N, W) (some extractors keep a batch axis); anything but 2D is an error."""
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        want = f"(N, {width})" if width is not None else "(N, D)"
        raise BagError(f"{path}: {what} must be {want}, got shape {tuple(arr.shape)}")
    return arr


def _coords_array(raw: np.ndarray, path: Path) -> np.ndarray:
    """Validate the (N, 2) coordinates and return them as int64 pixels."""
    coords = _squeeze_lead(raw, 2, "'coords'", path)
    if np.issubdtype(coords.dtype, np.integer):
        return coords.astype(np.int64, copy=False)
    if not np.issubdtype(coords.dtype, np.floating):
        raise BagError(f"{path}: 'coords' must be numeric, got dtype {coords.dtype}")
    # Float coordinates are accepted only when they are whole pixels: rounding anything else
    # would silently move patches.
    if not np.isfinite(coords).all() or (np.abs(coords - np.round(coords)) > 1e-6).any():
        raise BagError(f"{path}: 'coords' must be whole, finite pixel positions")
    return np.round(coords).astype(np.int64)


def _read_coords_h5(path: Path) -> tuple[np.ndarray, tuple[int | None, int]]:
    """(N, 2) int64 coords and the level-0 (patch size, overlap) from a patches (or features) h5."""
    f = _open_h5(path)
    try:
        with f:
            ds = _dataset(f, "coords", path)
            return _coords_array(ds[()], path), _patch_size_from_attrs(ds.attrs, path)
    except (OSError, KeyError, RuntimeError) as exc:
        raise BagError(f"{path}: could not read 'coords': {exc}") from exc


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int | None, int]]:
    f = _open_h5(path)
    try:
        with f:
            feats_ds = _dataset(f, "features", path)
            coords_ds = _dataset(f, "coords", path)
            feats = feats_ds[()]
            coords = _coords_array(coords_ds[()], path)
            size = _patch_size_from_attrs(coords_ds.attrs, path)
    except (OSError, KeyError, RuntimeError) as exc:
        # h5py raises these for files whose header opens but whose data is truncated.
        raise BagError(f"{path}: could not read the bag: {exc}") from exc
    return feats, coords, size


def _read_pt(path: Path) -> np.ndarray:
    if not path.is_file():
        raise BagError(f"{path}: no such file")
    try:
        from mamba2d.io import safe_torch_load

        obj = safe_torch_load(path)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for corrupt files alike
        from mamba2d.io import describe_load_error

        raise BagError(f"{path}: {describe_load_error(exc)}") from exc
    if not isinstance(obj, torch.Tensor):
        raise BagError(f"{path}: expected a (N, D) feature tensor, got {type(obj).__name__}")
    if obj.is_complex() or obj.dtype == torch.bool:
        raise BagError(f"{path}: features must be real numbers, got dtype {obj.dtype}")
    return obj.detach().to(torch.float32).numpy()


def _coords_candidates(features_dir: Path, stem: str, coords_dir: Path | None,
                       include_h5_files: bool = True) -> list[Path]:
    """Where a bag's patches h5 (coordinates and patch size) may be, most specific first.

    An explicit ``coords_dir`` is the only folder searched: falling back elsewhere could pair the
    features with another extraction's coordinates. Otherwise the CLAM and TRIDENT layouts: a
    ``patches/`` folder beside the features folder (or one level up), or CLAM's ``h5_files/``.
    Both file names are tried: CLAM's ``<slide>.h5`` and TRIDENT's ``<slide>_patches.h5``.
    """
    base = Path(features_dir)
    if coords_dir is not None:
        folders = [Path(coords_dir)]
    else:
        folders = [base.parent / "patches", base / "h5_files", base.parent / "h5_files", base / "patches",
                   base.parent.parent / "patches"]
        if not include_h5_files:
            folders = [f for f in folders if f.name != "h5_files"]
    out: list[Path] = []
    for folder in folders:
        for name in (f"{stem}.h5", f"{stem}_patches.h5"):
            path = folder / name
            if path not in out:
                out.append(path)
    return out


def _patch_folders_near(features_dir: Path) -> list[Path]:
    """``patches/`` folders of the sibling folders of a features folder and of its parent (CLAM's
    patching and feature folders are often siblings: RESULTS/patches beside FEATURES/h5_files)."""
    out = []
    for root in (features_dir.parent, features_dir.parent.parent):
        try:
            out += sorted(d / "patches" for d in root.iterdir() if (d / "patches").is_dir())
        except OSError:
            continue
    return out


def _patches_file_for(path: Path, coords: np.ndarray,
                      coords_path: str | Path | None) -> tuple[tuple[int | None, int], Path] | None:
    """(patch size and overlap, file) from the patches h5 holding exactly ``coords``, or None."""
    stem = slide_stem(path.stem)
    if coords_path is not None:
        tried = [Path(coords_path)]
    else:
        tried = _coords_candidates(path.parent, stem, None, include_h5_files=False)
        for folder in _patch_folders_near(path.parent):
            tried += [p for p in _coords_candidates(path.parent, stem, folder) if p not in tried]
    for cand in tried:
        if not cand.is_file() or cand.resolve() == path.resolve():
            continue
        theirs, sizes = _read_coords_h5(cand)
        if sizes[0] is not None and theirs.shape == coords.shape and (theirs == coords).all():
            return sizes, cand
    return None


def read_bag(path: str | Path, *, patch_size: int | None = None, coords_path: str | Path | None = None,
             check_finite: bool = True, slide_id: str | None = None) -> Bag:
    """Read one slide's bag from a CLAM/TRIDENT ``.h5``, or a CLAM ``.pt`` plus a patches h5.

    ``patch_size``: the level-0 patch side in pixels, for files without it in their attributes;
    when the file has one too and they differ, the argument wins and a warning names the file.
    ``coords_path``: the patches h5 of a ``.pt`` bag (its coordinates and patch size), or of an
    ``.h5`` bag whose coords carry no patch size (CLAM's features files: only the patch size is
    taken from it); found by the CLAM/TRIDENT layouts when omitted.
    ``check_finite``: NaN, Inf or absurdly large (> ``MAX_ABS_FEATURE``) features are an error (the
    default) instead of passing through.
    ``slide_id``: the id recorded in the bag; defaults to :func:`slide_stem` of the file name.

    Returns a :class:`Bag` with features (N, D) float32 and coords (N, 2) int64.
    Raises :class:`BagError`, naming the file, for every problem with the input.
    """
    path = Path(path)
    if patch_size is not None and (isinstance(patch_size, bool) or not isinstance(patch_size, int)
                                   or patch_size <= 0):
        raise BagError(f"{path}: patch_size must be a positive int of level-0 pixels, got {patch_size!r}")
    suffix = path.suffix.lower()
    size_src: Path | None = None
    if suffix in _H5_SUFFIXES:
        feats, coords, (file_size, overlap) = _read_h5(path)
        coords_src = path
        if file_size is None and patch_size is None:
            # CLAM's extract_features_fp.py writes coords without attributes; the patches h5 that
            # create_patches_fp.py wrote has them. Only a patches file with these very coordinates
            # counts: another extraction's could have another patch size.
            found = _patches_file_for(path, coords, coords_path)
            if found is not None:
                (file_size, overlap), size_src = found
    elif suffix in _PT_SUFFIXES:
        feats = _read_pt(path)
        if coords_path is None:
            tried = _coords_candidates(path.parent, path.stem, None)
            found = next((p for p in tried if p.is_file()), None)
            if found is None:
                raise BagError(f"{path}: no coordinates for this .pt bag; looked for "
                               f"{', '.join(str(p) for p in tried)}; pass coords_path=")
            coords_path = found
        coords_src = Path(coords_path)
        coords, (file_size, overlap) = _read_coords_h5(coords_src)
    else:
        raise BagError(f"{path}: unknown bag format {path.suffix!r}; expected .h5 or .pt")

    if not np.issubdtype(feats.dtype, np.number) or np.issubdtype(feats.dtype, np.complexfloating):
        raise BagError(f"{path}: 'features' must be real numbers, got dtype {feats.dtype}")
    feats = _squeeze_lead(feats, None, "'features'", path)
    n = feats.shape[0]
    if coords.shape[0] != n:
        src = "" if coords_src == path else f" (coords from {coords_src})"
        raise BagError(f"{path}: {n} feature rows but {coords.shape[0]} coordinates{src}")
    if n == 0:
        raise BagError(f"{path}: empty bag (0 patches)")
    if feats.shape[1] == 0:
        raise BagError(f"{path}: features have width 0")
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if check_finite:
        bad = ~np.isfinite(feats).all(axis=1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise BagError(f"{path}: features: {int(bad.sum())} of {n} rows hold NaN or Inf "
                           f"(first: row {first}); skip such slides with --skip-bad (skip_bad=True)")
        big = np.abs(feats) > MAX_ABS_FEATURE
        if big.any():
            row, col = (int(v) for v in np.argwhere(big)[0])
            raise BagError(f"{path}: features: {int(big.any(axis=1).sum())} of {n} rows hold values beyond "
                           f"±{MAX_ABS_FEATURE:g} (first: row {row}, column {col}: {feats[row, col]:.3g}), "
                           f"which overflow the models' arithmetic; skip such slides with --skip-bad")
    _check_unique_coords(coords, path)

    size = file_size
    if patch_size is not None:
        if file_size is not None and file_size != patch_size:
            warnings.warn(f"{path}: patch_size={patch_size} overrides the file's level-0 patch size "
                          f"{file_size}", stacklevel=2)
        size, overlap = patch_size, 0
    return Bag(
        slide_id=slide_id if slide_id is not None else slide_stem(path.stem),
        features=torch.from_numpy(feats),
        coords=torch.from_numpy(np.ascontiguousarray(coords)),
        patch_size_level0=size,
        path=path,
        overlap_level0=overlap,
        size_source=size_src if size is not None and patch_size is None else None,
    )


def _check_unique_coords(coords: np.ndarray, path: Path) -> None:
    """Two patches at one (x, y) mean a broken extraction; the grid could not hold both."""
    _, first, inverse = np.unique(coords, axis=0, return_index=True, return_inverse=True)
    repeats = np.flatnonzero(first[inverse.reshape(-1)] != np.arange(coords.shape[0]))
    if repeats.size:
        x, y = (int(v) for v in coords[repeats[0]])
        raise BagError(f"{path}: {repeats.size} patch(es) repeat a coordinate already in the bag; "
                       f"first duplicate (x={x}, y={y}) at row {int(repeats[0])}")


def _peek_dim(path: Path) -> int:
    """The feature width D without reading the features (h5), or by loading them (.pt)."""
    if path.suffix.lower() in _H5_SUFFIXES:
        f = _open_h5(path)
        try:
            with f:
                shape = _dataset(f, "features", path).shape
        except (OSError, KeyError, RuntimeError) as exc:
            raise BagError(f"{path}: could not read 'features': {exc}") from exc
        if len(shape) not in (2, 3):
            raise BagError(f"{path}: 'features' must be (N, D), got shape {shape}")
        return int(shape[-1])
    return int(_squeeze_lead(_read_pt(path), None, "'features'", path).shape[1])


# --------------------------------------------------------------------------------------------------
# A folder of bags


def discover_slides(features_dir: str | Path) -> list[str]:
    """The slide ids of every bag in a features folder (``<stem>.h5`` or ``.pt``, directly or in
    CLAM's ``h5_files/`` and ``pt_files/``), sorted. Raises :class:`BagError` when there is none."""
    d = Path(features_dir)
    if not d.is_dir():
        raise BagError(f"{d}: features folder does not exist")
    stems = {slide_stem(p.stem) for folder in (d, d / "h5_files", d / "pt_files") if folder.is_dir()
             for p in folder.iterdir() if p.suffix.lower() in _H5_SUFFIXES + _PT_SUFFIXES and p.is_file()}
    if not stems:
        raise BagError(f"{d}: no .h5 or .pt feature bags (looked in it, h5_files/ and pt_files/)")
    return sorted(stems)


@dataclass(frozen=True)
class GridCheck:
    """How :meth:`FeatureBagSet.validate` places bags on their grids: see :func:`patch_grid`."""

    snap: Snap = "auto"
    max_cells: int | None = None


@dataclass(frozen=True)
class BagSetReport:
    """What :meth:`FeatureBagSet.validate` found. Patch counts are per slide; sizes in level-0 pixels."""

    n_slides: int
    feature_dim: int | None
    n_patches_min: int
    n_patches_max: int
    n_patches_total: int
    patch_sizes_level0: tuple[int | None, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    grid_cells_max: int | None = None
    moved_patches: dict[str, int] = field(default_factory=dict)


class FeatureBagSet(Dataset):
    """The bags of a list of slides in one features folder, read lazily; ``dataset[i]`` is a :class:`Bag`.

    ``features_dir`` holds ``<stem>.h5`` (TRIDENT, or CLAM features) or ``<stem>.pt`` files, directly
    or in CLAM's ``h5_files/`` and ``pt_files/`` subfolders; ``.h5`` wins when both exist.
    ``slide_ids`` may carry slide extensions (``x.svs``); they are normalised by :func:`slide_stem`.
    ``coords_dir``: where ``.pt`` bags' patches h5 files are; by default the CLAM layout
    (``features_dir/../patches`` or ``features_dir/h5_files``).
    ``cache``: keep each bag in memory after its first read.
    ``skip_bad``: drop missing or bad slides with a warning each (recorded in ``self.skipped``)
    instead of raising. Missing files are found at construction; bad contents by :meth:`validate`.
    """

    def __init__(self, features_dir: str | Path, slide_ids: Iterable[str], *, patch_size: int | None = None,
                 coords_dir: str | Path | None = None, cache: bool = False, skip_bad: bool = False) -> None:
        self.features_dir = Path(features_dir)
        self.coords_dir = Path(coords_dir) if coords_dir is not None else None
        self.patch_size = patch_size
        self.cache = cache
        self.skip_bad = skip_bad
        self.skipped: dict[str, str] = {}
        self._cache: dict[str, Bag] = {}
        self._dim: int | None = None
        if not self.features_dir.is_dir():
            raise BagError(f"{self.features_dir}: features folder does not exist")
        if self.coords_dir is not None and not self.coords_dir.is_dir():
            raise BagError(f"{self.coords_dir}: coords folder does not exist")

        stems = [slide_stem(s) for s in slide_ids]
        dup = [s for s, c in Counter(stems).items() if c > 1]
        if dup:
            raise BagError(f"{self.features_dir}: slide id(s) listed more than once: {dup[:5]}")
        self.paths: dict[str, Path] = {}
        self.coords_paths: dict[str, Path | None] = {}
        missing: dict[str, str] = {}
        for stem in stems:
            found = self._locate(stem)
            if isinstance(found, str):
                missing[stem] = found
                self._skip(stem, found)
            else:
                self.paths[stem], self.coords_paths[stem] = found
        if missing and not skip_bad:
            ids = list(missing)
            more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
            # The first slide's reason names the folders searched (or the coordinates file lacking).
            raise BagError(f"{len(ids)} slide(s) have no features: {ids[:5]}{more}; "
                           f"{ids[0]}: {missing[ids[0]]}")
        self.slide_ids: list[str] = [s for s in stems if s in self.paths]

    def _feature_dirs(self) -> list[Path]:
        d = self.features_dir
        return [d, d / "h5_files", d / "pt_files"]

    def _locate(self, stem: str) -> tuple[Path, Path | None] | str:
        """(features file, coords file or None) for a slide, or why none was found."""
        d = self.features_dir
        for cand in (d / f"{stem}.h5", d / "h5_files" / f"{stem}.h5"):
            if cand.is_file():
                if self.coords_dir is None:
                    return cand, None  # read_bag looks beside it when the file lacks a patch size
                patches = next((p for p in _coords_candidates(d, stem, self.coords_dir) if p.is_file()), None)
                return cand, patches
        for cand in (d / f"{stem}.pt", d / "pt_files" / f"{stem}.pt"):
            if cand.is_file():
                tried = _coords_candidates(d, stem, self.coords_dir)
                if cand.parent != d:  # a pt_files/ subfolder: its CLAM siblings are candidates too
                    tried += [p for p in _coords_candidates(cand.parent, stem, self.coords_dir)
                              if p not in tried]
                coords = next((p for p in tried if p.is_file()), None)
                if coords is None:
                    return (f"{cand} has no coordinates file; looked for "
                            + ", ".join(str(p) for p in tried))
                return cand, coords
        return f"no {stem}.h5 or {stem}.pt in " + ", ".join(str(p) for p in self._feature_dirs())

    def _skip(self, stem: str, reason: str) -> None:
        if self.skip_bad:
            warnings.warn(f"skipping slide {stem}: {reason}", stacklevel=3)
            self.skipped[stem] = reason

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, index: int) -> Bag:
        stem = self.slide_ids[index]
        return self._load(stem)

    def _load(self, stem: str) -> Bag:
        bag = self._cache.get(stem)
        if bag is None:
            bag = self._read(stem)
            if self.cache:
                self._cache[stem] = bag
        return bag

    def _read(self, stem: str) -> Bag:
        return read_bag(self.paths[stem], patch_size=self.patch_size, coords_path=self.coords_paths[stem],
                        slide_id=stem)

    def index_of(self, slide_id: str) -> int:
        """Position of a slide (any spelling :func:`slide_stem` accepts) in this set."""
        stem = slide_stem(slide_id)
        try:
            return self.slide_ids.index(stem)
        except ValueError:
            raise KeyError(f"slide {stem} is not in this bag set ({self.features_dir})") from None

    @property
    def feature_dim(self) -> int:
        """D, the feature width: from :meth:`validate`, else peeked from the first slide's file."""
        if self._dim is None:
            if not self.slide_ids:
                raise BagError(f"{self.features_dir}: no slides, so no feature dim")
            self._dim = _peek_dim(self.paths[self.slide_ids[0]])
        return self._dim

    def validate(self, grid: GridCheck | None = None) -> BagSetReport:
        """Read every bag once and check it (see :func:`read_bag`) and that D agrees across slides.

        ``grid``: also place every bag on its grid (see :meth:`Bag.grid`) with these settings, so
        that a model scanning the grid meets no bad coordinates, missing patch size or oversized
        grid after training has started.

        With ``skip_bad`` a bad slide, or one whose D differs from the most common D, is dropped
        with a warning; otherwise the first problem raises :class:`BagError`.
        """
        sizes: dict[str, tuple[int, int, int | None]] = {}  # stem -> (N, D, patch size)
        ref: tuple[str, int] | None = None
        cells_max: int | None = None
        moved: dict[str, int] = {}
        for stem in list(self.slide_ids):
            try:
                bag = self._read(stem)
                if grid is not None:
                    placed = bag.grid(grid.snap, grid.max_cells)
                    cells_max = max(cells_max or 0, placed.cells)
                    if placed.moved:
                        moved[stem] = placed.moved
            except BagError as exc:
                if not self.skip_bad:
                    raise
                self._skip(stem, str(exc))
                continue
            if ref is None:
                ref = (stem, bag.feature_dim)
            elif bag.feature_dim != ref[1] and not self.skip_bad:
                raise BagError(f"feature dims differ: {self.paths[stem]} has D={bag.feature_dim} but "
                               f"{self.paths[ref[0]]} has D={ref[1]}")
            sizes[stem] = (bag.n_patches, bag.feature_dim, bag.patch_size_level0)
            if self.cache:
                self._cache[stem] = bag
        if sizes:
            # With skip_bad the majority decides, so one odd first file cannot evict every other slide.
            dims = Counter(d for _, d, _ in sizes.values())
            dim = max(dims, key=lambda d: (dims[d], -list(dims).index(d)))
            for stem, (_, d, _) in list(sizes.items()):
                if d != dim:
                    owner = next(s for s, v in sizes.items() if v[1] == dim)
                    self._skip(stem, f"{self.paths[stem]} has D={d} but {self.paths[owner]} and "
                                             f"{dims[dim] - 1} other slide(s) have D={dim}")
                    del sizes[stem]
                    self._cache.pop(stem, None)
            self._dim = dim
        self.slide_ids = [s for s in self.slide_ids if s in sizes]
        counts = [n for n, _, _ in sizes.values()]
        patch_sizes = {p for _, _, p in sizes.values()}
        moved = {k: v for k, v in moved.items() if k in sizes}
        if moved:
            total = sum(moved.values())
            warnings.warn(f"{len(moved)} slide(s) hold overlapping patch tilings (e.g. CLAM's per-contour "
                          f"tiling): {total} patch(es) moved to the nearest free grid cell; first: "
                          f"{self.paths[next(iter(moved))]} ({next(iter(moved.values()))})", stacklevel=2)
        return BagSetReport(
            n_slides=len(sizes),
            feature_dim=self._dim,
            n_patches_min=min(counts, default=0),
            n_patches_max=max(counts, default=0),
            n_patches_total=sum(counts),
            patch_sizes_level0=tuple(sorted(patch_sizes, key=lambda p: (p is None, p or 0))),
            skipped=dict(self.skipped),
            grid_cells_max=cells_max,
            moved_patches=moved,
        )
