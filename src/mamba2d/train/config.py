"""The training configuration: one dataclass behind the CLI flags and the YAML config file.

Values resolve as defaults < YAML file < command-line flags, and the resolved configuration is
saved as ``config.yaml`` in the run directory, so ``mamba2d train --config RUN/config.yaml``
repeats a run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_scalar(text: str) -> Any:
    """A command-line or YAML scalar as YAML 1.2 reads it: ``1e-3`` and ``2e-4`` are numbers
    (PyYAML's YAML 1.1 reads them as strings), then booleans, null, else the YAML value."""
    stripped = text.strip()
    for convert in (int, float):
        try:
            return convert(stripped)
        except ValueError:
            pass
    lowered = stripped.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~", ""):
        return None
    return yaml.safe_load(stripped)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to the type ``hint`` (str, int, float, bool, Optional, list[...],
    dict[...], Any); a ValueError naming ``where`` (file and field) when it cannot be.

    Strings are parsed (``"1e-3"`` -> 0.001, ``"yes"`` -> True, ``"0,1,2"`` -> [0, 1, 2]); whole
    floats become ints; a bool is never taken for a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if value is None:
        raise ValueError(f"{where}: a value is required, got null")
    if origin in (list, tuple):
        (item,) = args[:1] or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of key: value, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float):
        number = parse_scalar(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            kind = "an integer" if hint is int else "a number"
            raise ValueError(f"{where}: expected {kind}, got {value!r}")
        if hint is int:
            if isinstance(number, float) and not number.is_integer():
                raise ValueError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        return float(number)
    if hint is str:
        if isinstance(value, (dict, list, tuple)):
            raise ValueError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def _opt(help: str, **kw: Any) -> Any:
    default = kw.pop("default", None)
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class ConfigFile:
    """YAML round trip for a configuration dataclass: ``save`` writes every field, ``load`` reads
    a file (unknown keys are an error naming them; dashes in keys read as underscores)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        from mamba2d.io import write_text

        return write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def _normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Convert shorthand values (e.g. "0,1,2") to the field types; a hook for subclasses."""
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config"):
        """Build from a mapping (a YAML file's), converting every value to its field's type."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        values = cls._normalise(dict(values))
        return cls(**{k: coerce(v, hints[k], f"{source}: {k}") for k, v in values.items()})

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        return cls.from_dict({k.replace("-", "_"): v for k, v in values.items()}, source=str(path))


@dataclass
class TrainConfig(ConfigFile):
    """Everything a training run depends on. Field metadata gives each flag's help text."""

    features: str = _opt("folder of feature bags (CLAM/TRIDENT .h5, or CLAM .pt with patches .h5)")
    labels: str = _opt("label CSV: slide_id,label[,case_id] or case_id,slide_id,survival_months,censorship")
    out: str = _opt("run directory to create (or resume)")
    task: str = _opt("classification or survival", default="classification",
                     choices=("classification", "survival"))
    model: str = _opt("MIL model name (see `mamba2d train --list-models`)", default="2dmambamil")
    splits: str | None = _opt("split CSV (train,val,test columns) or a folder of splits_K.csv files")
    folds: int | None = _opt("generate stratified case-level K-fold splits (saved in the run directory)")
    val_fraction: float = _opt("fraction of the non-test cases kept for validation with --folds", default=0.1)
    preset: str = _opt("the recipe that fills epochs, lr, weight decay and model arguments not given: "
                       "default (each model's most robust settings, from the sensitivity study) or paper "
                       "(the 2DMamba paper's: lr 1e-4, 20 epochs, conv 1d)", default="default",
                       choices=("default", "paper"))
    epochs: int | None = _opt("training epochs (default: the model's recipe)")
    optimizer: str = _opt("adamw, or sgd (momentum 0.9, as CLAM's --opt sgd)", default="adamw",
                          choices=("adamw", "sgd"))
    lr: float | None = _opt("peak learning rate, cosine schedule to 0 (default: the model's recipe)")
    weight_decay: float | None = _opt("weight decay (default: the model's recipe)")
    seeds: list[int] = _opt("seeds to repeat each fold with, e.g. 0,1,2", default_factory=lambda: [0])
    tune: list[str] | None = _opt("choose these settings per fold on the validation part (never the test "
                                  "part): lr, and conv for 2dmambamil, e.g. lr,conv")
    tune_lrs: list[float] = _opt("learning rates --tune lr tries",
                                 default_factory=lambda: [5e-5, 1e-4, 2e-4, 5e-4, 1e-3])
    tuned: dict[str, Any] = _opt("what --tune chose for each fold and seed (written by the run)",
                                 default_factory=dict, hidden=True)
    accumulate: int = _opt("slides per optimizer step (gradient accumulation)", default=1)
    clip_grad: float | None = _opt("clip the gradient norm to this value before each step")
    balanced_sampling: bool = _opt("draw training slides with class-balanced weights", default=False)
    early_stopping: int | None = _opt("stop after this many epochs without a better validation score")
    device: str = _opt("auto, cpu, cuda or cuda:N", default="auto")
    precision: str = _opt("auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", default="auto",
                          choices=("auto", "bf16", "fp32"))
    patch_size: int | None = _opt("level-0 patch size in pixels, when the feature files lack it")
    patches_dir: str | None = _opt("CLAM's patches/ folder (coords h5 with the patch size), when it is not "
                                   "beside the features folder")
    grid_snap: str = _opt("placing patches on the grid: auto (each tiling, e.g. each CLAM contour, snapped "
                          "to one lattice; overlapping patches moved to a free cell) or strict (any patch "
                          "off the lattice is an error)", default="auto", choices=("auto", "strict"))
    max_grid_cells: int | None = _opt("refuse slides whose grid has more cells (default: 65,536 or 32 per "
                                      "patch, whichever is larger)")
    n_bins: int = _opt("survival: discrete time bins (quantiles of uncensored training times)", default=4)
    alpha_surv: float = _opt("survival: extra weight on uncensored patients in the NLL loss", default=0.0)
    label_col: str | None = _opt("label column, when not auto-detected")
    classes: list[str] | None = _opt("the classes, in this order: A,B,... or a text file with one per line; "
                                     "other labels are errors (skipped with --skip-bad)")
    slide_col: str | None = _opt("slide id column, when not auto-detected")
    case_col: str | None = _opt("case id column, when not auto-detected")
    cache: bool = _opt("keep feature bags in memory after the first read", default=False)
    skip_bad: bool = _opt("skip unreadable or invalid slides with a warning instead of stopping",
                          default=False)
    allow_leakage: bool = _opt("keep a split that puts a slide or a patient in two parts (some published "
                               "splits do), with a warning, instead of refusing it", default=False)
    model_args: dict[str, Any] = _opt("extra model keyword arguments (YAML mapping, or key=value flags)",
                                      default_factory=dict)
    progress: bool = _opt("show progress bars", default=True)
    tensorboard: bool = _opt("also log every epoch's metrics for TensorBoard (RUN/tensorboard/)",
                             default=False)
    stop_after_epochs: int | None = _opt("stop each fold after this many epochs in this call (for testing "
                                         "--resume)", hidden=True)

    def apply_recipe(self) -> TrainConfig:
        """Fill epochs, lr and weight decay left unset from the model's recipe under ``preset``, and
        put the recipe's model arguments under the given ones (see :mod:`mamba2d.mil.recipes`)."""
        from mamba2d.mil.recipes import recipe_for

        recipe = recipe_for(self.model, self.preset)
        for name in ("epochs", "lr", "weight_decay"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(recipe, name))
        self.model_args = {**recipe.model_args, **self.model_args}
        return self

    def check(self) -> TrainConfig:
        """Apply the recipe, then raise ValueError naming the first invalid field."""
        self.apply_recipe()
        for name in ("features", "labels", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')} is required")
        if self.task not in ("classification", "survival"):
            raise ValueError(f"task must be 'classification' or 'survival', got {self.task!r}")
        if self.splits and self.folds:
            raise ValueError("give either --splits or --folds, not both")
        positive = {"epochs": self.epochs, "accumulate": self.accumulate, "n_bins": self.n_bins}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.folds is not None and self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be positive, got {self.clip_grad}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        for what in self.tune or []:
            if what not in ("lr", "conv"):
                raise ValueError(f"tune: can tune lr and conv, got {what!r}")
            if what == "conv" and self.model != "2dmambamil":
                raise ValueError(f"tune: conv is a 2dmambamil setting; {self.model} has none")
        if not self.tune_lrs or any(lr <= 0 for lr in self.tune_lrs):
            raise ValueError(f"tune_lrs must be positive learning rates, got {self.tune_lrs}")
        if self.preset not in ("default", "paper"):
            raise ValueError(f"preset must be default or paper, got {self.preset!r}")
        if self.grid_snap not in ("auto", "strict"):
            raise ValueError(f"grid_snap must be auto or strict, got {self.grid_snap!r}")
        if self.max_grid_cells is not None and self.max_grid_cells < 1:
            raise ValueError(f"max_grid_cells must be positive, got {self.max_grid_cells}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        return self

    @classmethod
    def _normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        if isinstance(values.get("classes"), str):
            values["classes"] = parse_classes(values["classes"])
        for key in ("tune", "tune_lrs"):
            if isinstance(values.get(key), str):
                values[key] = [v.strip() for v in values[key].split(",") if v.strip()]
        if isinstance(values.get("seeds"), (int, str)):
            values["seeds"] = parse_seeds(str(values["seeds"]))
        return values


def parse_classes(text: str) -> list[str]:
    """'IDC,ILC', or the path of a text file with one class per line (blank lines and # comments
    ignored), to the list of class names."""
    path = Path(text)
    if path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        names = [line for line in lines if line]
        if not names:
            raise ValueError(f"{path}: --classes file names no class")
        return names
    return [c.strip() for c in text.split(",") if c.strip()]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' to a list of ints."""
    text = text.strip()
    if "-" in text and "," not in text and not text.startswith("-"):
        lo, hi = (int(v) for v in text.split("-", 1))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",") if v.strip()]


def parse_model_args(pairs: list[str]) -> dict[str, Any]:
    """['d_model=256', 'scan=raster'] to {'d_model': 256, 'scan': 'raster'} (values read by
    :func:`parse_scalar`, so ``lr=1e-3`` is a number)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--model-arg expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_scalar(value)
    return out


@dataclass
class VisionTrainConfig(ConfigFile):
    """A `mamba2d vision-train` run: image classification or mosaic segmentation with a backbone
    from timm's registry (the 2DVMamba builders included). Field metadata gives each flag's help."""

    out: str = _opt("run directory to create (or resume)")
    task: str = _opt("classification, or segmentation (UperNet head on the backbone's four maps)",
                     default="classification", choices=("classification", "segmentation"))
    data: str = _opt("'fashion-mnist' (built in; segmentation uses its mosaics) or, for classification, an "
                     "ImageFolder root with train/ and val/ class subfolders", default="fashion-mnist")
    model: str = _opt("backbone: a 2DVMamba builder of mamba2d.vision.BUILDERS (`mamba2d vision-train "
                      "--help` lists them) or any timm model", default="vmamba2d_tiny")
    img_size: int | None = _opt("input side in pixels, a multiple of 32 (default: 32 for Fashion-MNIST "
                                "classification, 64 for mosaics, 224 for folders)")
    epochs: int = _opt("training epochs", default=10)
    batch_size: int = _opt("images per step on each process", default=128)
    opt: str = _opt("timm optimizer name", default="adamw")
    lr: float = _opt("peak learning rate", default=1e-3)
    min_lr: float = _opt("learning rate at the end of the cosine schedule", default=1e-5)
    warmup_epochs: int = _opt("linear warm-up epochs", default=1)
    warmup_lr: float = _opt("learning rate at the start of the warm-up", default=1e-6)
    weight_decay: float = _opt("weight decay (not on norms, biases, A, D, dt bias)", default=0.05)
    sched: str = _opt("timm scheduler name", default="cosine")
    clip_grad: float | None = _opt("clip the gradient norm to this value")
    drop_path: float | None = _opt("stochastic depth rate (default: the model's)")
    smoothing: float = _opt("label smoothing", default=0.1)
    mixup: float = _opt("mixup alpha (0: off)", default=0.0)
    cutmix: float = _opt("cutmix alpha (0: off)", default=0.0)
    aa: str | None = _opt("timm AutoAugment policy for RGB data, e.g. rand-m9-mstd0.5-inc1")
    reprob: float = _opt("random erasing probability", default=0.0)
    scale_min: float = _opt("smallest area fraction of the random resized crop", default=0.08)
    hflip: float = _opt("horizontal flip probability", default=0.5)
    color_jitter: float = _opt("colour jitter strength", default=0.4)
    ema: bool = _opt("keep an exponential moving average of the weights and evaluate it too", default=False)
    ema_decay: float = _opt("EMA decay per step", default=0.9998)
    train_limit: int | None = _opt("use only the first N training images (or mosaics)")
    val_limit: int | None = _opt("use only the first N validation images (or mosaics)")
    mosaics: int = _opt("segmentation: training mosaics to draw (validation: a fifth as many)", default=10000)
    head_channels: int = _opt("segmentation: width of the UperNet head", default=128)
    seed: int = _opt("seed of every random draw", default=0)
    workers: int = _opt("data-loading worker processes", default=4)
    device: str = _opt("auto, cpu, cuda or cuda:N", default="auto")
    precision: str = _opt("auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", default="auto",
                          choices=("auto", "bf16", "fp32"))
    model_args: dict[str, Any] = _opt("extra model keyword arguments (key=value flags)", default_factory=dict)
    progress: bool = _opt("show progress bars", default=True)
    stop_after_epochs: int | None = _opt("stop after this many epochs in this call (for testing --resume)",
                                         hidden=True)

    def check(self) -> VisionTrainConfig:
        """Raise ValueError naming the first invalid field."""
        if not self.out:
            raise ValueError("--out is required")
        if self.task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', got {self.task!r}")
        if self.task == "segmentation" and self.data != "fashion-mnist":
            raise ValueError("segmentation trains on the built-in Fashion-MNIST mosaics "
                             "(--data fashion-mnist)")
        if self.data != "fashion-mnist" and not Path(self.data, "train").is_dir():
            raise ValueError(f"--data {self.data}: expected 'fashion-mnist' or a folder with train/ and val/ "
                             f"class subfolders")
        for name in ("epochs", "batch_size", "mosaics", "head_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.img_size is not None and (self.img_size < 32 or self.img_size % 32):
            raise ValueError(f"img_size must be a positive multiple of 32, got {self.img_size}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be positive and min_lr non-negative, got {self.lr} and {self.min_lr}")
        if not 0.0 < self.scale_min <= 1.0:
            raise ValueError(f"scale_min must be in (0, 1], got {self.scale_min}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.batch_size % 2 and (self.mixup > 0 or self.cutmix > 0):
            raise ValueError("mixup and cutmix need an even batch_size")
        return self

    def resolved_img_size(self) -> int:
        if self.img_size is not None:
            return self.img_size
        if self.task == "segmentation":
            return 64
        return 32 if self.data == "fashion-mnist" else 224
