"""The training configuration: one dataclass behind the CLI flags and the YAML config file.

Values resolve as defaults < YAML file < command-line flags, and the resolved configuration is
saved as ``config.yaml`` in the run directory, so ``mamba2d train --config RUN/config.yaml``
repeats a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _opt(help: str, **kw: Any) -> Any:
    default = kw.pop("default", None)
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
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
    epochs: int = _opt("training epochs", default=20)
    lr: float = _opt("AdamW learning rate (cosine schedule to 0)", default=1e-4)
    weight_decay: float = _opt("AdamW weight decay", default=1e-5)
    seeds: list[int] = _opt("seeds to repeat each fold with, e.g. 0,1,2", default_factory=lambda: [0])
    accumulate: int = _opt("slides per optimizer step (gradient accumulation)", default=1)
    clip_grad: float | None = _opt("clip the gradient norm to this value before each step")
    balanced_sampling: bool = _opt("draw training slides with class-balanced weights", default=False)
    early_stopping: int | None = _opt("stop after this many epochs without a better validation score")
    device: str = _opt("auto, cpu, cuda or cuda:N", default="auto")
    precision: str = _opt("auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", default="auto",
                          choices=("auto", "bf16", "fp32"))
    patch_size: int | None = _opt("level-0 patch size in pixels, when the feature files lack it")
    n_bins: int = _opt("survival: discrete time bins (quantiles of uncensored training times)", default=4)
    alpha_surv: float = _opt("survival: extra weight on uncensored patients in the NLL loss", default=0.0)
    label_col: str | None = _opt("label column, when not auto-detected")
    classes: list[str] | None = _opt("keep only these classes, in this order, e.g. IDC,ILC (slides with "
                                     "other labels are dropped with a warning)")
    slide_col: str | None = _opt("slide id column, when not auto-detected")
    case_col: str | None = _opt("case id column, when not auto-detected")
    cache: bool = _opt("keep feature bags in memory after the first read", default=False)
    skip_bad: bool = _opt("skip unreadable or invalid slides with a warning instead of stopping",
                          default=False)
    model_args: dict[str, Any] = _opt("extra model keyword arguments (YAML mapping, or key=value flags)",
                                      default_factory=dict)
    progress: bool = _opt("show progress bars", default=True)
    stop_after_epochs: int | None = _opt("stop each fold after this many epochs in this call (for testing "
                                         "--resume)", hidden=True)

    def check(self) -> TrainConfig:
        """Raise ValueError naming the first invalid field."""
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
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        from mamba2d.train.checkpoint import write_text

        return write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
        values = dict(values)
        if isinstance(values.get("classes"), str):
            values["classes"] = [c.strip() for c in values["classes"].split(",") if c.strip()]
        if isinstance(values.get("seeds"), (int, str)):
            values["seeds"] = parse_seeds(str(values["seeds"]))
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
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


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' to a list of ints."""
    text = text.strip()
    if "-" in text and "," not in text and not text.startswith("-"):
        lo, hi = (int(v) for v in text.split("-", 1))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",") if v.strip()]


def parse_model_args(pairs: list[str]) -> dict[str, Any]:
    """['d_model=256', 'scan=raster'] to {'d_model': 256, 'scan': 'raster'} (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--model-arg expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out
