"""The training loop: configuration, data, model, optimizer, then the loop itself with
autocast, clipping, EMA, validation and checkpoints in plain sight."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import logging
import math
import pickle
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoint import (
    _unpickler_detail,
    inspect_checkpoint,
    load_model,
    one_line,
    save_checkpoint,
)
from ..config import config_for_variant
from ..distributed import Ranks, ranks
from ..errors import ParagonSRError
from ..files import atomic_write
from ..inference import optimize_for_inference
from ..network import ParagonSR
from .data import (
    DataError,
    PatchSampler,
    bicubic_upscale,
    downscale,
    list_images,
    load_validation,
    readable,
    split_holdout,
)

log = logging.getLogger(__name__)

STATE_FILE = "resume_state.pt"
MODEL_FILE = "model_ema.safetensors"
LOG_FILE = "training_log.csv"
LOG_COLUMNS = (
    "iteration",
    "loss",
    "lr",
    "val_psnr",
    "bicubic_psnr",
    "images_per_second",
    "seconds",
)
MAX_BAD_STEPS = 5


class TrainingError(ParagonSRError, RuntimeError):
    """Training that cannot start or had to stop, with the reason."""


@dataclass
class TrainConfig:
    data: str
    out: str
    val: str | None = None
    # Without ``val``: the share of the training images held out for validation (seeded by
    # ``seed``, at least one image); 0 trains on every image and validates on none.
    holdout: float = 0.1
    lr_data: str | None = None  # paired LR folder; else LR is made by bicubic downscaling
    variant: str = "nano"
    scale: int = 2
    in_chans: int = 3
    iters: int = 5000
    batch: int = 8
    lq_size: int = 64
    lr: float | None = None  # 5e-4 from scratch, 2e-5 when fine-tuning (--init)
    warmup: int | None = None  # iterations; 2% of the run by default
    schedule: str = "cosine"  # constant | cosine | multistep
    milestones: tuple[int, ...] = ()
    loss: str = "l1"  # l1 | charbonnier
    ms_ssim_weight: float = 0.0
    clip: float = 1.0
    ema_decay: float = 0.999
    val_every: int = 500
    save_every: int = 1000
    log_every: int = 100  # iterations per row of the CSV log (validations add their own rows)
    seed: int = 0
    threads: int | None = None
    init: str | None = None
    resume: bool = False
    degrade: bool = False
    device: str = "auto"

    def validate(self) -> None:
        """Refuse settings no run can use, one line each, before anything is read or written."""
        positive = {
            "--iters": self.iters,
            "--batch": self.batch,
            "--lq-size": self.lq_size,
            "--scale": self.scale,
            "--val-every": self.val_every,
            "--save-every": self.save_every,
            "--log-every": self.log_every,
        }
        for flag, value in positive.items():
            if value < 1:
                raise TrainingError(f"{flag} {value}: must be at least 1")
        if self.scale > 16:
            raise TrainingError(f"--scale {self.scale}: ParagonSR supports scales 1-16")
        if self.threads is not None and self.threads < 0:
            raise TrainingError(f"--threads {self.threads}: must be 0 (all cores) or more")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr {self.lr}: must be positive and finite, e.g. 5e-4")
        if any(m < 1 for m in self.milestones):
            listed = ",".join(str(m) for m in self.milestones)
            raise TrainingError(f"--milestones {listed}: iterations must be at least 1")
        if self.warmup is not None and self.warmup < 0:
            raise TrainingError(f"--warmup {self.warmup}: must be 0 or more iterations")
        # Written so that NaN fails each test too.
        if not 0 <= self.ema_decay < 1:
            raise TrainingError(
                f"--ema {self.ema_decay:g}: the EMA decay must be from 0 up to (not including) "
                "1, e.g. 0.999"
            )
        if not 0 <= self.holdout < 1:
            raise TrainingError(
                f"--holdout {self.holdout:g}: the share of images held out for validation must "
                "be from 0 (none) up to (not including) 1, e.g. 0.1"
            )
        if not self.clip > 0:
            raise TrainingError(
                f"--clip {self.clip:g}: the gradient norm limit must be positive (inf: no clipping)"
            )
        if not (self.ms_ssim_weight >= 0 and math.isfinite(self.ms_ssim_weight)):
            raise TrainingError(f"--ms-ssim {self.ms_ssim_weight:g}: the weight must be 0 or more")
        if self.device not in ("auto", "cuda"):
            try:
                device = torch.device(self.device)
            except (RuntimeError, ValueError):
                raise TrainingError(
                    f"--device {self.device}: unknown device; use auto, cpu or cuda:N"
                ) from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise TrainingError(f"--device {self.device}: CUDA is not available; use cpu")
            if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
                raise TrainingError(
                    f"--device {self.device}: there are {torch.cuda.device_count()} CUDA "
                    "devices, numbered from 0"
                )

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-5 if self.init else 5e-4

    def resolved_warmup(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.iters // 50)


@dataclass
class TrainResult:
    iteration: int
    cancelled: bool
    model_path: Path
    seconds: float
    last_loss: float
    validation: list[dict] = field(default_factory=list)  # {"iteration", "psnr", "bicubic"}
    losses: list[float] = field(default_factory=list)
    # What the PSNR figures were measured on, in words (a held-out folder, images held out of
    # the training folder, or none).
    validation_source: str = ""
    log_path: Path | None = None


def charbonnier(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-3):
    return torch.sqrt((prediction - target).square() + eps * eps).mean()


def psnr(prediction: torch.Tensor, target: torch.Tensor, border: int) -> float:
    if border:
        prediction = prediction[..., border:-border, border:-border]
        target = target[..., border:-border, border:-border]
    mse = (prediction.double() - target.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def lr_factor(iteration: int, config: TrainConfig) -> float:
    warmup = config.resolved_warmup()
    if iteration < warmup:
        return (iteration + 1) / warmup
    if config.schedule == "cosine":
        progress = (iteration - warmup) / max(1, config.iters - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "multistep":
        return 0.5 ** sum(iteration >= m for m in config.milestones)
    return 1.0


@torch.no_grad()
def update_ema(ema: ParagonSR, model: ParagonSR, iteration: int, decay: float) -> None:
    # The decay warms up, (1 + t) / (10 + t), so the average is not stuck on the first weights.
    rate = min(decay, (1 + iteration) / (10 + iteration))
    for average, current in zip(ema.parameters(), model.parameters(), strict=True):
        average.lerp_(current, 1 - rate)


@torch.no_grad()
def validate(ema: ParagonSR, images, scale: int, device: torch.device) -> dict:
    # Folded once per validation: the network users will deploy, and faster than the plain one.
    network = optimize_for_inference(ema)
    ours, bicubic = [], []
    for _, hr in images:
        lr = downscale(hr, scale)
        with torch.inference_mode():
            prediction = network(lr.to(device)).float().cpu().clamp_(0, 1)
        ours.append(psnr(prediction, hr, scale))
        bicubic.append(psnr(bicubic_upscale(lr, scale), hr, scale))
    return {"psnr": sum(ours) / len(ours), "bicubic": sum(bicubic) / len(bicubic)}


def atomic_torch_save(value, path: Path) -> None:
    with atomic_write(path) as temporary:
        torch.save(value, temporary)


def _check_run_folder(out: Path, resume: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"\0" * 65536)  # a full disk fails here, before any training
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"{out}: the run folder is not writable ({error.strerror})") from None
    if not resume and (out / STATE_FILE).exists():
        raise TrainingError(
            f"{out}: holds a previous run; pass --resume to continue it or choose another folder"
        )


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def train(
    config: TrainConfig,
    *,
    progress: Callable[[dict], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train (or resume) as configured. ``progress`` receives a dict after every iteration
    (iteration, loss, lr, seconds, and psnr/bicubic after validations); ``cancelled()`` is
    checked every iteration, and True saves a resumable state and returns."""
    config.validate()
    # Only the main rank creates the run folder, so only it may take the folder back.
    created = _missing_folders(Path(config.out)) if ranks().is_main else []
    try:
        return _train(config, progress, cancelled)
    except BaseException:
        # A run that failed before its first save leaves no empty folder behind.
        for folder in created:
            with contextlib.suppress(OSError):  # not empty, or gone: leave it
                folder.rmdir()
        raise


def _train(
    config: TrainConfig,
    progress: Callable[[dict], None] | None,
    cancelled: Callable[[], bool] | None,
) -> TrainResult:
    # --- configuration ---------------------------------------------------------------------
    out = Path(config.out)
    # Under torchrun every rank draws the same global batch from the same seeded generator and
    # trains on its slice; DDP averages the gradients, so N ranks take exactly the steps one
    # process would take with the whole batch, and a resume state fits any number of ranks.
    world = ranks()
    device = world.device(config.device)
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if config.batch % world.world:
        raise TrainingError(f"--batch {config.batch} does not split over {world.world} ranks")
    if world.is_main:
        _check_run_folder(out, config.resume)
    if world.distributed:
        dist.barrier()
    if config.threads or (world.distributed and device.type == "cpu"):
        torch.set_num_threads(config.threads or world.cpu_threads())
    if config.schedule not in ("constant", "cosine", "multistep"):
        raise TrainingError(f"unknown schedule {config.schedule!r}")
    if config.loss not in ("l1", "charbonnier"):
        raise TrainingError(f"unknown loss {config.loss!r}")

    # --- data --------------------------------------------------------------------------------
    training_files, validation_files, validation_source = _split_data(config)
    sampler = PatchSampler(
        Path(config.data),
        config.scale,
        config.lq_size,
        config.in_chans,
        Path(config.lr_data) if config.lr_data else None,
        config.degrade,
        hr_files=training_files,
    )
    validation = (
        load_validation(validation_files, config.scale, config.in_chans, validation_source)
        if validation_files
        else []
    )
    if world.is_main:
        log.info("validation: %s", validation_source)

    # --- model -------------------------------------------------------------------------------
    torch.manual_seed(config.seed)
    if config.init:
        inspection = inspect_checkpoint(config.init)
        if inspection.form != "training":
            raise TrainingError(
                f"{config.init}: a fused checkpoint cannot be trained (its "
                "spatial mixers lost their branches); use the training form"
            )
        model = load_model(config.init)
        if model.config.scale != config.scale:
            raise TrainingError(
                f"{config.init}: is a x{model.config.scale} model, not x{config.scale}"
            )
    else:
        model = ParagonSR(config_for_variant(config.variant, config.scale, config.in_chans))
    model.to(device).train()
    ema = copy.deepcopy(model).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    trainer = model
    if world.distributed:
        trainer = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast_dtype = None
    if device.type == "cuda":
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)

    # --- optimizer -----------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.resolved_lr(), betas=(0.9, 0.99), weight_decay=0.0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, config))
    generator = torch.Generator().manual_seed(config.seed)
    iteration, history = 0, {"losses": [], "validation": [], "log": []}
    if config.resume:
        state = _load_state(out / STATE_FILE, model)

        def set_rng(rng: dict) -> None:
            generator.set_state(rng["data"])
            torch.set_rng_state(rng["torch"])

        loaders = {
            "model": model.load_state_dict,
            "ema": ema.load_state_dict,
            "optimizer": optimizer.load_state_dict,
            "scheduler": scheduler.load_state_dict,
            "scaler": scaler.load_state_dict,
            "rng": set_rng,
        }
        for key, load in loaders.items():
            try:
                load(state[key])
            except Exception as error:  # torch's loaders raise many kinds on foreign content
                raise _state_error(
                    out / STATE_FILE, f"its {key!r} entry does not fit this run ({one_line(error)})"
                ) from None
        iteration = state["iteration"]
        history = state["history"]
        history.setdefault("log", [])  # states saved before the CSV log existed
        if world.is_main:
            _write_log(out / LOG_FILE, history["log"])  # rows written after that save go

    def add_log_row(scores: dict | None) -> None:
        nonlocal window_started, window_iterations, window_paused
        previous = history["log"][-1]["iteration"] if history["log"] else 0
        losses = history["losses"][previous:iteration]
        history["log"].append(
            {
                "iteration": iteration,
                "loss": sum(losses) / len(losses) if losses else math.nan,
                "lr": optimizer.param_groups[0]["lr"],
                "val_psnr": scores["psnr"] if scores else None,
                "bicubic_psnr": scores["bicubic"] if scores else None,
                "images_per_second": config.batch * window_iterations / max(window_seconds(), 1e-9),
                "seconds": time.perf_counter() - started,
            }
        )
        window_started, window_iterations, window_paused = time.perf_counter(), 0, 0.0
        _write_log(out / LOG_FILE, history["log"])

    def window_seconds() -> float:
        return time.perf_counter() - window_started - window_paused

    def save() -> None:
        if not world.is_main:
            return
        save_checkpoint(
            ema,
            out / MODEL_FILE,
            overwrite=True,
            metadata={"architecture": "ParagonSR", "form": "training", "iteration": str(iteration)},
        )
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "iteration": iteration,
                "history": history,
                "rng": {"data": generator.get_state(), "torch": torch.get_rng_state()},
                "config": {k: v for k, v in asdict(config).items() if v is not None},
                "model_config": asdict(model.config),
            },
            out / STATE_FILE,
        )

    # --- the loop ------------------------------------------------------------------------------
    started = time.perf_counter()
    # Throughput of the rows of the log: training steps only, validation and saving left out.
    window_started, window_iterations, window_paused = started, 0, 0.0
    bad_steps, was_cancelled, loss_value = 0, False, math.nan
    while iteration < config.iters:
        if _any_rank(world, cancelled is not None and cancelled(), device):
            was_cancelled = True
            break
        lr_batch, hr_batch = sampler.batch(config.batch, generator)
        share = config.batch // world.world
        mine = slice(world.rank * share, (world.rank + 1) * share)
        lr_batch, hr_batch = lr_batch[mine].to(device), hr_batch[mine].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            prediction = trainer(lr_batch)
        prediction = prediction.float()
        loss = (
            F.l1_loss(prediction, hr_batch)
            if config.loss == "l1"
            else charbonnier(prediction, hr_batch)
        )
        if config.ms_ssim_weight:
            from .losses import ms_ssim

            loss = loss + config.ms_ssim_weight * (1 - ms_ssim(prediction.clamp(0, 1), hr_batch))
        loss_value = _mean_over_ranks(world, loss.detach())
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss_value):
            bad_steps += 1
            log.warning("iteration %d: loss is %s, step skipped", iteration, loss_value)
            if bad_steps >= MAX_BAD_STEPS:
                save()
                raise TrainingError(
                    f"{MAX_BAD_STEPS} non-finite losses in a row at iteration {iteration}; "
                    "lower --lr or check the data (a resumable state was saved)"
                )
            continue
        bad_steps = 0
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        update_ema(ema, model, iteration, config.ema_decay)
        iteration += 1
        window_iterations += 1
        history["losses"].append(loss_value)
        report = {
            "iteration": iteration,
            "loss": loss_value,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        paused = time.perf_counter()
        scores = None
        if (
            world.is_main
            and validation
            and (iteration % config.val_every == 0 or iteration == config.iters)
        ):
            scores = validate(ema, validation, config.scale, device)
            history["validation"].append({"iteration": iteration, **scores})
            report.update(scores)
        window_paused += time.perf_counter() - paused
        if world.is_main and (
            scores or iteration % config.log_every == 0 or iteration == config.iters
        ):
            add_log_row(scores)
        if iteration % config.save_every == 0:
            paused = time.perf_counter()
            save()
            window_paused += time.perf_counter() - paused
        if progress is not None:
            progress(report)
    save()
    if world.distributed:
        dist.barrier()
    return TrainResult(
        iteration,
        was_cancelled,
        out / MODEL_FILE,
        time.perf_counter() - started,
        loss_value,
        history["validation"],
        history["losses"],
        validation_source,
        out / LOG_FILE if world.is_main else None,
    )


def _split_data(config: TrainConfig) -> tuple[list[Path], list[Path], str]:
    """(training images, validation images, where the validation images come from in words).
    A validation folder's images never train, even where it lies inside the training folder."""
    data = Path(config.data)
    files = list_images(data)
    if config.val:
        validation = list_images(Path(config.val))
        held = {path.resolve() for path in validation}
        training = [path for path in files if path.resolve() not in held]
        if not training:
            raise DataError(
                f"{data}: every image in it is also in the validation folder {config.val}; "
                "validate on images the network does not train on"
            )
        if len(training) < len(files):
            log.warning(
                "%d images of %s lie in the validation folder %s and are left out of training",
                len(files) - len(training),
                data,
                config.val,
            )
        return (
            training,
            validation,
            f"the held-out folder {config.val} ({_images(len(validation))})",
        )
    if config.holdout == 0:
        return files, [], "none (--holdout 0: every image trains)"
    training, held_out = split_holdout(files, config.holdout, config.seed, data, readable)
    names = ", ".join(path.name for path in held_out[:5]) + (", ..." if len(held_out) > 5 else "")
    return (
        training,
        held_out,
        f"{len(held_out)} of the {len(files)} images of {data} held out (seed {config.seed}): "
        f"{names}",
    )


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def _write_log(path: Path, rows: list[dict]) -> None:
    """The whole CSV log, replaced atomically: a reader never sees half a row."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(LOG_COLUMNS)
    for row in rows:
        writer.writerow(_log_cell(row.get(column)) for column in LOG_COLUMNS)
    with atomic_write(path) as temporary:
        Path(temporary).write_text(text.getvalue(), encoding="utf-8")


def _log_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _mean_over_ranks(world: Ranks, value: torch.Tensor) -> float:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.world
    return value.item()


def _any_rank(world: Ranks, flag: bool, device: torch.device) -> bool:
    """A stop requested on any rank stops them all, at the same iteration."""
    if not world.distributed:
        return flag
    votes = torch.tensor([int(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


# What a resume state must hold, and of which type: checked before any of it is loaded.
STATE_ENTRIES = {
    "model": dict,
    "ema": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "iteration": int,
    "history": dict,
    "rng": dict,
    "model_config": dict,
}


def _a(name: str) -> str:
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _state_error(path: Path, problem: str) -> TrainingError:
    return TrainingError(
        f"{path}: {problem}; start without --resume or point --out at the right run"
    )


def _load_state(path: Path, model: ParagonSR) -> dict:
    if not path.exists():
        raise _state_error(path, "no resume state to continue from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _state_error(
            path, f"unreadable resume state ({_unpickler_detail(str(error))})"
        ) from None
    except Exception as error:  # truncated or foreign files fail in many ways
        raise _state_error(path, f"unreadable resume state ({one_line(error)})") from None
    if not isinstance(state, dict):
        raise _state_error(path, f"not a resume state (it holds {_a(type(state).__name__)})")
    for key, kind in STATE_ENTRIES.items():
        if key not in state:
            raise _state_error(path, f"the resume state has no {key!r} entry")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _state_error(
                path,
                f"its {key!r} entry is {_a(type(value).__name__)}, not {_a(kind.__name__)}",
            )
    saved, current = state["model_config"], asdict(model.config)
    if saved != current:
        differing = sorted(k for k in current if saved.get(k) != current[k])
        raise TrainingError(
            f"{path}: the resume state is for another network ({', '.join(differing)} differ: "
            f"{', '.join(f'{k}={saved.get(k)}' for k in differing)}); use the same --variant "
            "and --scale, or another run folder"
        )
    if state["iteration"] < 0:
        raise _state_error(path, f"its 'iteration' entry is negative ({state['iteration']})")
    history = state["history"]
    for key in ("losses", "validation"):
        if not isinstance(history.get(key), list):
            raise _state_error(path, f"its 'history' entry has no {key!r} list")
    return state


__all__ = ["DataError", "TrainConfig", "TrainResult", "TrainingError", "train"]
