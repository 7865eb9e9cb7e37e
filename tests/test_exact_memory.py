"""Exact tiling's memory: streamed maps in unlinked scratch files, CPU allocation failures
retried smaller, and the memory limits automatic tiling respects."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from helpers import REFERENCE, float64_reference, randomized_model, seeded_image
from paragonsr import config_for_variant, runtime
from paragonsr.errors import UpscaleError
from paragonsr.exact_tiling import StreamedMap, scratch_folder
from paragonsr.inference import InferenceBlock
from paragonsr.spandrel_arch import load_descriptor
from paragonsr.tiles import is_out_of_memory
from paragonsr.upscale import UpscaleSettings, auto_tile, upscale

CPU_ALLOCATION_FAILURE = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_map_round_trips_bands_of_rows(tmp_path, monkeypatch, dtype) -> None:
    monkeypatch.setenv("PARAGONSR_SCRATCH", str(tmp_path))
    values = torch.randn(2, 5, 9, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    stream = StreamedMap(2, 5, 9, 7, dtype)
    try:
        stream.write(0, values[:, :, :4].contiguous(memory_format=torch.channels_last))
        stream.write(4, values[:, :, 4:])  # any layout is accepted
        assert torch.equal(stream.read(0, 9), values)
        assert torch.equal(stream.read(3, 6), values[:, :, 3:6])
        assert stream.read(2, 5).is_contiguous(memory_format=torch.channels_last)
        # The file has no name: nothing to clean up after a crash, even SIGKILL.
        assert list(tmp_path.iterdir()) == []
    finally:
        stream.close()


@pytest.mark.parametrize(
    ("variant", "scale", "batch", "tile"),
    [("nano", 2, 1, 32), ("tiny", 3, 2, 40), ("nano", 1, 1, 53)],
)
@pytest.mark.parametrize("where", ["scratch files", "memory"])
def test_both_map_stores_give_the_whole_image_result(
    tmp_path, monkeypatch, variant, scale, batch, tile, where
) -> None:
    """Scratch files (two maps updated in place, bands written after the next band's read) and
    memory (three maps, views) against the float64 whole-image forward; no file is left."""
    if where == "scratch files":
        monkeypatch.setenv("PARAGONSR_SCRATCH", str(tmp_path))
    else:
        monkeypatch.delenv("PARAGONSR_SCRATCH", raising=False)
    model = randomized_model(config_for_variant(variant, scale))
    image = torch.cat([seeded_image(3, 70, 90, seed=seed) for seed in range(batch)])
    output = upscale(model, image, UpscaleSettings(tile=tile))
    assert (output - float64_reference(model, image).float().clamp(0, 1)).abs().max() < 1e-4
    assert list(tmp_path.iterdir()) == []


def test_a_full_scratch_disk_is_one_line_naming_the_folder_and_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("PARAGONSR_SCRATCH", str(tmp_path))

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", disk_full)
    model = randomized_model(config_for_variant("nano", 2))
    with pytest.raises(UpscaleError) as caught:
        upscale(model, seeded_image(3, 64, 64), UpscaleSettings(tile=32))
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "No space left on device" in message
    assert "PARAGONSR_SCRATCH" in message and "overlap mode" in message


def test_a_scratch_folder_that_cannot_hold_a_file_is_named(tmp_path, monkeypatch) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("PARAGONSR_SCRATCH", str(missing))
    model = randomized_model(config_for_variant("nano", 2))
    with pytest.raises(UpscaleError, match=f"maps in {missing}, which cannot hold"):
        upscale(model, seeded_image(3, 64, 64), UpscaleSettings(tile=32))


def test_scratch_folder_avoids_a_ram_file_system(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("PARAGONSR_SCRATCH", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() caches its first answer
    mounts = [(str(tmp_path), "tmpfs"), ("/", "ext4")]
    monkeypatch.setattr("paragonsr.exact_tiling._file_system_types", lambda: mounts)
    assert scratch_folder() == "/var/tmp"
    mounts[0] = (str(tmp_path), "ext4")
    assert scratch_folder() == str(tmp_path)


def test_cpu_allocation_failures_count_as_out_of_memory() -> None:
    assert is_out_of_memory(RuntimeError(CPU_ALLOCATION_FAILURE))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("size mismatch"))
    assert not is_out_of_memory(ValueError("can't allocate memory"))


@pytest.mark.parametrize("mode", ["exact", "overlap", "exact with scratch files"])
def test_a_failed_cpu_allocation_retries_with_smaller_tiles(tmp_path, monkeypatch, mode) -> None:
    """Under ulimit -v or a cgroup limit, torch's CPU allocator raises a RuntimeError: the tile
    is halved as for CUDA out-of-memory, and the result is unchanged. With scratch files the
    maps are updated in place, so the retried band must start from rows nothing overwrote."""
    if mode == "exact with scratch files":
        monkeypatch.setenv("PARAGONSR_SCRATCH", str(tmp_path))
        mode = "exact"
    model = randomized_model(config_for_variant("nano", 2))
    image = seeded_image(3, 96, 96)
    expected = upscale(model, image, UpscaleSettings(tile=96, mode=mode))
    original = InferenceBlock.ffn_delta
    failed, big = [], []
    # Scratch files: fail in the second band of a pass (two tiles per band), after the first
    # band was read, computed and queued for writing.
    fail_at = 2 if "PARAGONSR_SCRATCH" in os.environ else 0

    def flaky(self, normed, numerics):
        if normed.shape[-1] > 40 and not failed:
            big.append(normed.shape)
            if len(big) > fail_at:
                failed.append(normed.shape)
                raise RuntimeError(CPU_ALLOCATION_FAILURE)
        return original(self, normed, numerics)

    monkeypatch.setattr(InferenceBlock, "ffn_delta", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output = upscale(model, image, UpscaleSettings(tile=95, mode=mode, overlap=8))
    assert len(failed) == 1
    if mode == "exact":
        assert (output - expected).abs().max().item() < 1e-4
    else:  # overlap mode's smaller tiles blend differently, but every pixel is computed
        assert torch.isfinite(output).all() and output.shape == expected.shape


def _fake_cgroup(root, version: int, limit: str, usage: int, inactive_file: int) -> str:
    """A cgroup tree under ``root`` as the kernel shows it; returns the /proc/self/cgroup text."""
    if version == 2:
        folder = root / "user.slice" / "job"
        folder.mkdir(parents=True)
        (folder / "memory.max").write_text(limit + "\n")
        (folder / "memory.current").write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(f"anon 1\ninactive_file {inactive_file}\nfile 3\n")
        return "0::/user.slice/job\n"
    folder = root / "memory"
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(limit + "\n")
    (folder / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {inactive_file}\n")
    return "12:cpuset:/\n11:memory:/job\n0::/\n"


@pytest.mark.parametrize("version", [1, 2])
def test_a_cgroup_limit_lowers_the_memory_automatic_tiling_plans_with(
    tmp_path, monkeypatch, version
):
    proc = tmp_path / "cgroup"
    proc.write_text(_fake_cgroup(tmp_path, version, str(3 << 30), 2 << 30, 256 << 20))
    monkeypatch.setattr(runtime, "PROC_CGROUP", str(proc))
    monkeypatch.setattr(runtime, "CGROUP_ROOT", str(tmp_path))
    # 3 GiB limit, 2 GiB used of which 256 MiB is reclaimable page cache.
    assert runtime._cgroup_room() == (1 << 30) + (256 << 20)
    assert runtime.available_cpu_memory() <= (1 << 30) + (256 << 20)

    descriptor = load_descriptor(REFERENCE / "tiny_x4.train.safetensors")
    limited = auto_tile(descriptor, torch.device("cpu"), torch.float32, 3000, 4000)
    roomy = auto_tile(descriptor, torch.device("cpu"), torch.float32, 3000, 4000, free=64 << 30)
    assert 32 <= limited < roomy


@pytest.mark.parametrize("limit", ["max", str(1 << 62)])
def test_no_cgroup_limit_means_no_cgroup_room(tmp_path, monkeypatch, limit) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text(_fake_cgroup(tmp_path, 2 if limit == "max" else 1, limit, 1 << 30, 0))
    monkeypatch.setattr(runtime, "PROC_CGROUP", str(proc))
    monkeypatch.setattr(runtime, "CGROUP_ROOT", str(tmp_path))
    assert runtime._cgroup_room() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ulimit -v is POSIX, VmSize Linux")
def test_ulimit_v_lowers_the_available_memory() -> None:
    script = textwrap.dedent(
        """
        import resource
        from paragonsr.runtime import _proc_status_bytes, available_cpu_memory
        used = _proc_status_bytes("VmSize")
        resource.setrlimit(resource.RLIMIT_AS, (used + (300 << 20), resource.RLIM_INFINITY))
        print(available_cpu_memory())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert 0 < int(result.stdout) <= 300 << 20
