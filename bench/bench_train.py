"""Training throughput on the CPU, as a table.

    .venv/bin/python bench/bench_train.py [--threads 2] [--steps 20]

For nano and tiny x2 (batch 8, LR crops 64): iterations per second of this pack's training step
(forward with the summed mixer kernel, backward, AdamW, clipping) against the same step run the
way the original trains (three branch convolutions per spatial mixer, LayerScale through
permute/contiguous copies), on the same model and data; then the cost of one EMA update and of
one validation pass (two 256x256 images) relative to a training step.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_seconds  # noqa: E402
from reference_style import reference_style  # noqa: E402

from paragonsr import build_model  # noqa: E402
from paragonsr.train.loop import update_ema, validate  # noqa: E402


def step_timer(model, lr_batch, hr_batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))

    def step() -> None:
        loss = F.l1_loss(model(lr_batch), hr_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lq-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# CPU, {args.threads} threads, batch {args.batch}, LR crops {args.lq_size}, "
        f"torch {torch.__version__}, median of {args.steps} steps"
    )
    print(
        "| model | ours it/s | original-style it/s | ratio | EMA update / step | "
        "validation (2 x 256x256) / step |"
    )
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for variant in ("nano", "tiny"):
        torch.manual_seed(0)
        model = build_model(variant, 2).train()
        lr_batch = torch.rand(args.batch, 3, args.lq_size, args.lq_size, generator=generator)
        hr_batch = torch.rand(
            args.batch, 3, args.lq_size * 2, args.lq_size * 2, generator=generator
        )
        ours = median_seconds(step_timer(model, lr_batch, hr_batch), args.steps)
        original_model = copy.deepcopy(model)
        with reference_style():
            original = median_seconds(step_timer(original_model, lr_batch, hr_batch), args.steps)
        ema = copy.deepcopy(model).eval()
        ema_seconds = median_seconds(
            lambda e=ema, m=model: update_ema(e, m, 100, 0.999), args.steps
        )
        images = [("a", torch.rand(1, 3, 256, 256, generator=generator)) for _ in range(2)]
        validation = median_seconds(
            lambda e=ema, i=images: validate(e, i, 2, torch.device("cpu")), 3
        )
        print(
            f"| {variant} x2 | {1 / ours:.2f} | {1 / original:.2f} | {original / ours:.2f} | "
            f"{ema_seconds / ours:.3f} | {validation / ours:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
