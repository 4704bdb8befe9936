"""The built-in spatial MIL benchmark and the demo that trains on it.

"Slides" are mosaics of real images labelled by the 2D arrangement of a few lesion tiles. The
package sits above ``train`` and ``wsi`` and is split by job:

* :mod:`~mamba2d.bench.rules`: the layout rules, a registry of arrangements (one function each);
* :mod:`~mamba2d.bench.config`: the configuration, presets, random streams and cache folder;
* :mod:`~mamba2d.bench.layout`: one slide's tissue mask, background and lesion placement;
* :mod:`~mamba2d.bench.survival`: survival outcomes from the lesions' arrangement;
* :mod:`~mamba2d.bench.sources`: the tile images (Fashion-MNIST, or the digits fallback);
* :mod:`~mamba2d.bench.features`: the tile encoder and its feature cache;
* :mod:`~mamba2d.bench.dataset`: writing the benchmark folder (h5 bags, labels, splits);
* :mod:`~mamba2d.bench.render`: reading a slide back as a mosaic image;
* :mod:`~mamba2d.bench.demo`: ``mamba2d demo``, training and comparing models on it;
* :mod:`~mamba2d.bench.tasks`: the spatial tasks, a registry of binary (and survival) labels defined
  by arrangements that need 2D context, and controls;
* :mod:`~mamba2d.bench.taskdata`: building a task's dataset from Fashion-MNIST features or
  synthetic Gaussian prototypes;
* :mod:`~mamba2d.bench.sweep`: training sweeps over tasks in a pool of workers, and their report
  (the sensitivity study, ``benchmarks/sensitivity.py``).

The full description is in ``docs/benchmark.md``.
"""

from mamba2d.bench.config import PRESETS, BenchmarkConfig, BenchmarkError, default_benchmark_dir
from mamba2d.bench.dataset import build_benchmark
from mamba2d.bench.layout import SlideLayout, sample_layout
from mamba2d.bench.render import lesion_cells, render_mosaic
from mamba2d.bench.rules import CLASS_NAMES, RULES, rule
from mamba2d.bench.taskdata import TaskConfig, build_task
from mamba2d.bench.tasks import TASKS, sample_task_layout, task

__all__ = ["CLASS_NAMES", "PRESETS", "RULES", "TASKS", "BenchmarkConfig", "BenchmarkError", "SlideLayout",
           "TaskConfig", "build_benchmark", "build_task", "default_benchmark_dir", "lesion_cells",
           "render_mosaic", "rule", "sample_layout", "sample_task_layout", "task"]
