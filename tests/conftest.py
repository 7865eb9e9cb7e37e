"""Every test starts from the same random state, and the optimized network on the host's threads."""

import pytest
import torch

from paragonsr.inference import OptimizedParagonSR


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _host_threads(monkeypatch) -> None:
    """On a machine shared with other work the optimized network would run some calls on fewer
    threads than others (paragonsr.cpu_threads), and GroupNorm's sums round differently on one
    thread than on two (2e-5 on tiny x4): tests that compare two calls bit for bit must not see
    that. tests/test_eager_cpu.py turns it on where it tests it."""
    monkeypatch.setattr(OptimizedParagonSR, "share_cores", False)
