"""The optimized network's eager CPU path: Mish's arithmetic, and the threads a call runs on when
other work shares the cores (paragonsr.cpu_threads)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import randomized_model, seeded_image
from paragonsr import config_for_variant, optimize_for_inference
from paragonsr import cpu_threads as ct
from paragonsr.inference import GRAPH, OptimizedParagonSR, mish_

# |x| up to 1e4 densely near 0, where Mish bends, and sparsely beyond.
MISH_INPUTS = torch.cat((torch.linspace(-40, 40, 160001), torch.linspace(-1e4, 1e4, 20001)))


def _old_mish(x: torch.Tensor) -> torch.Tensor:
    """The formula mish_ replaced (exp throughout), as the yardstick for half precision."""
    exp = torch.exp(x)
    denominator = (exp + 2).mul_(exp).add_(2)
    return torch.addcdiv(x, x, denominator, value=-2.0)


def test_mish_matches_float64_mish_and_leaves_its_input() -> None:
    x = MISH_INPUTS.clone()
    got = mish_(x)
    assert torch.equal(x, MISH_INPUTS)
    error = (got.double() - F.mish(MISH_INPUTS.double())).abs()
    assert error.max().item() < 1.5e-6


def test_mish_at_the_extremes() -> None:
    x = torch.tensor([0.0, 88.0, 89.0, 1e30, -1e30, -200.0, float("nan")])
    got = mish_(x)
    torch.testing.assert_close(got[:6], torch.tensor([0.0, 88.0, 89.0, 1e30, 0.0, 0.0]))
    assert got[6].isnan()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mish_in_half_precision_is_as_exact_as_before(dtype: torch.dtype) -> None:
    x = MISH_INPUTS.clamp(-60, 60).to(dtype)
    exact = F.mish(x.double())
    error = (mish_(x).double() - exact).abs().max().item()
    assert mish_(x).dtype == dtype
    assert error <= (_old_mish(x).double() - exact).abs().max().item()


# -- choosing threads ------------------------------------------------------------------------


def _fake_loadavg(tmp_path, monkeypatch, runnable: int, cores: int = 2, online: int = 2):
    """/proc/loadavg saying ``runnable`` tasks are runnable, on a machine of ``online`` cores of
    which this process may use ``cores``; no decision made yet."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.50 0.40 0.30 {runnable}/123 4567\n")
    monkeypatch.setattr(ct, "LOADAVG", str(loadavg))
    monkeypatch.setattr(ct, "cores", lambda: cores)
    monkeypatch.setattr(ct.os, "cpu_count", lambda: online)
    monkeypatch.setattr(ct, "_decided", None)
    return loadavg


@pytest.mark.parametrize(
    ("runnable", "own", "cores", "online", "host", "expected"),
    [
        (1, 1, 2, 2, 2, 2),  # only the calling thread runs: both cores are free
        (2, 2, 2, 2, 2, 2),  # the call and its spinning OpenMP thread: still free
        (2, 1, 2, 2, 2, 1),  # one other task: one core left
        (3, 2, 2, 2, 2, 1),  # the same seen from two threads
        (6, 2, 2, 2, 2, 1),  # never fewer than one thread
        (3, 1, 8, 8, 4, 4),  # never more than the host set
        (10, 2, 2, 8, 2, 1),  # 8 others spread over 8 cores: 2 of them on our 2
        (4, 2, 2, 8, 2, 2),  # 2 others over 8 cores: half a task on ours
        (4, 1, 4, 4, 1, 1),  # a host that asks for one thread gets one
    ],
)
def test_threads_follow_the_cores_other_work_leaves_free(
    tmp_path, monkeypatch, runnable, own, cores, online, host, expected
) -> None:
    _fake_loadavg(tmp_path, monkeypatch, runnable, cores, online)
    assert ct.threads_for_free_cores(host, own) == expected


def test_a_task_seen_in_one_look_only_does_not_count(monkeypatch) -> None:
    looks = iter([3, 2, 3])
    monkeypatch.setattr(ct, "_runnable_tasks", lambda: next(looks))
    monkeypatch.setattr(ct, "cores", lambda: 2)
    monkeypatch.setattr(ct.os, "cpu_count", lambda: 2)
    assert ct.others_running(2) == 0


def test_without_proc_the_host_setting_stands(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ct, "LOADAVG", str(tmp_path / "missing"))
    assert ct.others_running(1) is None
    assert ct.threads_for_free_cores(2, 1) == 2


@pytest.fixture
def host_threads():
    """Two host threads for the test, and whatever the session had afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(saved)


def _sharing(net: OptimizedParagonSR) -> OptimizedParagonSR:
    """``net`` sharing the cores, as outside the tests (conftest.py turns it off)."""
    net.share_cores = True
    return net


def _record_thread_changes(monkeypatch) -> list[int]:
    changes: list[int] = []
    real = torch.set_num_threads

    def record(count: int) -> None:
        changes.append(count)
        real(count)

    monkeypatch.setattr(torch, "set_num_threads", record)
    return changes


def test_a_busy_core_runs_the_call_on_one_thread_and_restores_the_host_setting(
    tmp_path, monkeypatch, host_threads
) -> None:
    _fake_loadavg(tmp_path, monkeypatch, 3)  # the call, its OpenMP thread, one other task
    net = _sharing(optimize_for_inference(randomized_model(config_for_variant("nano", 2))))
    image = seeded_image(3, 19, 23)
    changes = _record_thread_changes(monkeypatch)
    with torch.inference_mode():
        shared = net(image)
        net.share_cores = False
        whole = net(image)
    assert changes == [1, host_threads]
    assert torch.get_num_threads() == host_threads
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)


def test_the_next_call_starts_from_the_last_decision(tmp_path, monkeypatch, host_threads) -> None:
    _fake_loadavg(tmp_path, monkeypatch, 3)
    net = _sharing(optimize_for_inference(randomized_model(config_for_variant("nano", 2))))
    image = seeded_image(3, 16, 16)
    seen = []
    head = net.head

    def watched_head(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return head(x)

    monkeypatch.setattr(net, "head", watched_head)
    with torch.inference_mode():
        net(image)  # the first call learns that a core is busy after its first pass
        net(image)
    assert seen == [host_threads, 1]


def test_free_cores_change_nothing(tmp_path, monkeypatch, host_threads) -> None:
    _fake_loadavg(tmp_path, monkeypatch, 2)  # the call and its OpenMP thread
    net = _sharing(optimize_for_inference(randomized_model(config_for_variant("nano", 2))))
    changes = _record_thread_changes(monkeypatch)
    with torch.inference_mode():
        net(seeded_image(3, 16, 16))
        net(seeded_image(3, 16, 16))
    assert changes == []


def test_the_host_setting_comes_back_when_the_call_fails(
    tmp_path, monkeypatch, host_threads
) -> None:
    _fake_loadavg(tmp_path, monkeypatch, 3)
    net = _sharing(optimize_for_inference(randomized_model(config_for_variant("nano", 2))))

    def fail(*args: object) -> None:
        assert torch.get_num_threads() == 1
        raise RuntimeError("a pass failed")

    monkeypatch.setattr(net, "fuse", fail)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="a pass failed"):
        net(seeded_image(3, 16, 16))
    assert torch.get_num_threads() == host_threads


def test_a_decision_is_reused_for_a_moment_then_made_again(
    tmp_path, monkeypatch, host_threads
) -> None:
    loadavg = _fake_loadavg(tmp_path, monkeypatch, 3)
    now = [100.0]
    monkeypatch.setattr(ct.time, "monotonic", lambda: now[0])
    with ct.FreeCoreThreads() as threads:
        threads.check()
        assert torch.get_num_threads() == 1
        loadavg.write_text("0.5 0.5 0.5 1/123 4567\n")  # the other work ended
        threads.check()
        assert torch.get_num_threads() == 1  # within RECHECK_SECONDS: the same decision
        now[0] += 2 * ct.RECHECK_SECONDS
        threads.check()
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == host_threads


def test_graphs_and_tracers_never_read_the_machine(monkeypatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("looked at /proc")

    monkeypatch.setattr(ct, "threads_for_free_cores", refuse)
    model = randomized_model(config_for_variant("nano", 2))
    image = seeded_image(3, 12, 12)
    with torch.inference_mode():
        _sharing(optimize_for_inference(model, numerics=GRAPH))(image)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation, size-dependent bands
        torch.jit.trace(_sharing(optimize_for_inference(model)), image, check_trace=False)


def test_torch_compile_sees_no_thread_choice() -> None:
    net = _sharing(optimize_for_inference(randomized_model(config_for_variant("nano", 2))))
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(net)(seeded_image(3, 24, 20))
    assert explanation.graph_break_count == 0, explanation.break_reasons
