"""What every benchmark here shares."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from paragonsr import ParagonSR, config_for_variant


def seeded_model(variant: str, scale: int, depth_scaled: bool = False) -> ParagonSR:
    """A seeded network of a named variant with LayerScale gammas of 0.05-0.4, as trained
    models have (a fresh model's 1e-5 would leave the blocks nearly idle). ``depth_scaled``
    shrinks them by sqrt(6 / blocks) so deep variants keep outputs near [0, 1] instead of
    amplifying float rounding through dozens of random blocks."""
    torch.manual_seed(0)
    config = config_for_variant(variant, scale)
    model = ParagonSR(config).eval()
    factor = min(1.0, (6 / (config.num_groups * config.num_blocks)) ** 0.5) if depth_scaled else 1
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.uniform_(0.05 * factor, 0.4 * factor)
    return model


def median_seconds(function: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """Median wall time of ``repeats`` calls, after one untimed call unless ``warm_up`` is
    False (to time first calls such as loading a file)."""
    if warm_up:
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def package_at(revision: str):
    """This package as it was at a git revision, imported under its own name, so one run can
    time the code before and after a change (`--baseline REV` in the benchmarks)."""
    import importlib
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", revision], cwd=root, check=True, capture_output=True
        )
        .stdout.decode()
        .strip()
    )
    name = f"paragonsr_{commit}"
    if name not in sys.modules:
        folder = Path(tempfile.mkdtemp(prefix="paragonsr-baseline-"))
        archive = subprocess.run(
            ["git", "archive", commit, "paragonsr"], cwd=root, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
        (folder / "paragonsr").rename(folder / name)
        sys.path.insert(0, str(folder))
        importlib.import_module(name)
    return sys.modules[name]


def baseline_optimized(revision: str, model: ParagonSR) -> tuple[str, torch.nn.Module]:
    """(label, the optimized network of ``revision``'s code) for ``model``'s weights."""
    old = package_at(revision)
    twin = old.ParagonSR(old.ParagonSRConfig(**model.config.to_dict()), fused=model.form == "fused")
    twin.load_state_dict(model.state_dict())
    return f"optimized at {revision}", old.optimize_for_inference(twin.eval())
