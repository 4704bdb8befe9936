"""What the subcommands share: the flag generator for the training configs, their resolution
(defaults < --config file < flags, or the saved run with --resume), and the run-end messages."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

#: The object ``add_subparsers`` returns; each subcommand module adds its parser to it.
Subparsers = argparse._SubParsersAction

#: Argument groups of a training command: title -> config field names, in help order.
FlagGroups = dict[str, tuple[str, ...]]

#: Placeholders shown in --help for config fields (fields not listed show their upper-cased name).
METAVARS = {"features": "DIR", "labels": "CSV", "splits": "CSV|DIR", "out": "RUN_DIR", "folds": "K",
            "epochs": "N", "lr": "LR", "weight_decay": "WD", "accumulate": "N", "early_stopping": "EPOCHS",
            "patch_size": "PIXELS", "n_bins": "N", "alpha_surv": "ALPHA", "val_fraction": "FRACTION",
            "device": "DEVICE", "label_col": "COLUMN", "slide_col": "COLUMN", "case_col": "COLUMN",
            "model": "NAME", "classes": "A,B|FILE", "patches_dir": "DIR",
            "max_grid_cells": "N", "clip_grad": "NORM", "data": "fashion-mnist|DIR",
            "img_size": "PIXELS", "train_limit": "N", "val_limit": "N", "mosaics": "N", "workers": "N",
            "drop_path": "RATE", "head_channels": "N", "batch_size": "N", "opt": "NAME", "min_lr": "LR",
            "warmup_epochs": "N", "warmup_lr": "LR", "sched": "NAME", "ema_decay": "DECAY", "seed": "S",
            "scale_min": "FRACTION", "hflip": "P", "color_jitter": "X", "aa": "POLICY", "reprob": "P",
            "smoothing": "X", "mixup": "ALPHA", "cutmix": "ALPHA"}

_TYPES = {"int": int, "float": float, "int | None": int, "float | None": float}


def _default_text(default: Any) -> str:
    """' (default: X)' for the help of a field, or '' when the default is unset (None, False, empty)."""
    if default is None or default is False or default in ([], {}):
        return ""
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return f" (default: {shown})"


def _add_field_flag(group: argparse._ArgumentGroup, field: dataclasses.Field, default: Any,
                    choices: list[str] | None, help_text: str | None) -> None:
    """One config field's flag. It defaults to None so that only flags given override a --config file;
    the help text carries the field's real default (ArgumentDefaultsHelpFormatter would show None)."""
    flag = "--" + field.name.replace("_", "-")
    kw: dict = {"default": None, "help": (help_text or field.metadata["help"]) + _default_text(default)}
    if field.type == "bool":
        group.add_argument(flag, action="store_const", const=True, **kw)
    elif field.name == "seeds":
        group.add_argument(flag, metavar="0,1,2", **kw)
    else:
        group.add_argument(flag, type=_TYPES.get(str(field.type), str),
                           choices=choices if choices is not None else field.metadata.get("choices"),
                           metavar=METAVARS.get(field.name), **kw)


def add_config_flags(parser: argparse.ArgumentParser, cls: type, groups: FlagGroups, *,
                     choices: dict[str, list[str]] | None = None, helps: dict[str, str] | None = None,
                     model_arg_example: str = "") -> None:
    """The flags of a training command: one per field of the config dataclass ``cls`` named in
    ``groups``, in those argument groups, with the field's help (or ``helps[name]``) and default;
    --model-arg in the "model" group; --config, --resume, --no-progress and the hidden
    --stop-after-epochs. ``choices`` replaces a field's own choices."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            _add_field_flag(group, fields[name], getattr(defaults, name), (choices or {}).get(name),
                            (helps or {}).get(name))
        if title == "model":
            example = f" (e.g. --model-arg {model_arg_example})" if model_arg_example else ""
            group.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                               help="model keyword argument, repeatable" + example)
    parser.add_argument("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="YAML", help="read options from a YAML file (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def argument_group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The argument group ``title`` that :func:`add_config_flags` made, to add a command's own flags."""
    return next(g for g in parser._action_groups if g.title == title)


def resolve_config(cls, args: argparse.Namespace, given: dict):
    """The run's configuration: defaults < --config file < flags. With --resume, the run's own
    config.yaml with the given flags applied; the training function then refuses any flag that
    contradicts the saved run (only the device, progress output and the test stop may change)."""
    if args.resume:
        out = Path(given["out"]) if "out" in given else None
        if out is None or not (out / "config.yaml").is_file():
            raise ValueError(f"--resume needs --out RUN_DIR of an earlier run (no {out}/config.yaml)")
        cfg = cls.load(out / "config.yaml")
        cfg.stop_after_epochs = None
    else:
        cfg = cls.load(args.config) if args.config else cls()
    # Flags go through the same conversion as a config file's values (e.g. "0,1,2" to [0, 1, 2]).
    cfg = cls.from_dict({**cfg.to_dict(), **given}, source="command line")
    return cfg.check()


def config_from_flags(cls, args: argparse.Namespace, groups: FlagGroups, **extra: Any):
    """The resolved config of a training command: the config-field flags given (those in
    ``groups``, and --stop-after-epochs), --model-arg, --no-progress and ``extra`` over
    :func:`resolve_config`'s base."""
    from mamba2d.train.config import parse_model_args

    names = {name for fields in groups.values() for name in fields} | {"stop_after_epochs"}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    given.update(extra)
    if args.model_arg:
        given["model_args"] = parse_model_args(args.model_arg)
    if args.no_progress:
        given["progress"] = False
    return resolve_config(cls, args, given)


def reports_results() -> bool:
    """Whether this process prints the run's results: under torchrun only rank 0 does."""
    return int(os.environ.get("RANK", "0")) == 0


def said_stopped(result: dict, command: str, out: str) -> bool:
    """If the run stopped at --stop-after-epochs, say how to continue it and return True."""
    if not result.get("interrupted"):
        return False
    print(f"stopped as asked (--stop-after-epochs); continue with: mamba2d {command} --resume --out {out}")
    return True
