"""The only module that touches ComfyUI: folders, devices, memory, progress and interrupts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

MODEL_FOLDER = "upscale_models"


def register_bundled_models(folder: Path) -> None:
    """List the pack's own models (the default nano x2) in every upscale-model picker, Load
    ParagonSR and ComfyUI's stock Load Upscale Model alike, without copying anything into the
    user's folders. The user's own folder stays first, so files the nodes save go there."""
    if folder.is_dir():
        folder_paths.add_model_folder_path(MODEL_FOLDER, str(folder))


def model_names() -> list[str]:
    return folder_paths.get_filename_list(MODEL_FOLDER)


def model_path(name: str) -> Path:
    return Path(folder_paths.get_full_path_or_raise(MODEL_FOLDER, name))


def attach_patcher(descriptor):
    """What ComfyUI's stock loader attaches, so its upscale node accepts our models."""
    descriptor.patcher = comfy.model_patcher.CoreModelPatcher(
        descriptor.model,
        load_device=model_management.get_torch_device(),
        offload_device=model_management.unet_offload_device(),
    )
    return descriptor


def load_for_inference(descriptor, working_bytes: int) -> torch.device:
    """Load the model onto its device through ComfyUI's model management, as the stock upscale
    node does: ComfyUI offloads other models to make room for it and ``working_bytes`` more,
    accounts for it, and moves it back when it needs the room. Returns the device."""
    if getattr(descriptor, "patcher", None) is None:
        attach_patcher(descriptor)
    model_management.load_models_gpu(
        [descriptor.patcher], memory_required=working_bytes, force_full_load=True
    )
    return descriptor.patcher.load_device


def progress_ticker() -> Callable[[int, int], None]:
    bar: list[comfy.utils.ProgressBar] = []

    def tick(done: int, total: int) -> None:
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)

    return tick


def interrupt_check() -> Callable[[], bool]:
    """Raises ComfyUI's InterruptProcessingException (a BaseException the engine never catches)
    when the user pressed Cancel; otherwise reports no cancellation."""

    def check() -> bool:
        model_management.throw_exception_if_processing_interrupted()
        return False

    return check


def upscale_models_directory() -> Path:
    return Path(folder_paths.get_folder_paths(MODEL_FOLDER)[0])


def show_text(text: str):
    """What a node returns as ``ui=`` to show ``text`` on itself in the browser."""
    from comfy_api.latest import ui

    return ui.PreviewText(text)


def output_directory() -> Path:
    return Path(folder_paths.get_output_directory())


def dataset_directory(name: str) -> Path:
    """An absolute path as given, or a folder inside ComfyUI's input directory."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


def interrupted() -> bool:
    return model_management.processing_interrupted()


def raise_if_interrupted() -> None:
    model_management.throw_exception_if_processing_interrupted()


def numbered(folder: Path, prefix: str, suffix: str) -> Path:
    """The first ``prefix_00001suffix``-style name not taken in ``folder``. A prefix that would
    leave the folder (separators, "..", absolute paths) is refused."""
    from paragonsr.errors import ParagonSRError

    if (
        not prefix
        or Path(prefix).is_absolute()
        or any(c in prefix for c in "/\\")
        or (".." in prefix)
    ):
        raise ParagonSRError(
            f"filename prefix {prefix!r} must be a plain name (no folders, '..' or absolute "
            f"paths): files go into {folder}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ParagonSRError(f"{folder}: cannot create the folder ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ParagonSRError(f"{folder}: the folder is not writable")
    for counter in range(1, 100000):
        path = folder / f"{prefix}_{counter:05d}{suffix}"
        if not path.exists():
            return path
    raise FileExistsError(f"{folder}: no free name for {prefix}")
