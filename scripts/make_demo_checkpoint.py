"""Write models/demo_nano_x2_untrained.safetensors: a seeded, untrained nano x2 training checkpoint.

It exists so the README's first command has something to inspect and fuse on a fresh clone,
before a trained default model ships. Its outputs are not meant to look good.
"""

from pathlib import Path

import torch

from paragonsr import build_model, save_checkpoint

if __name__ == "__main__":
    torch.manual_seed(0)
    target = (
        Path(__file__).resolve().parent.parent / "models" / "demo_nano_x2_untrained.safetensors"
    )
    save_checkpoint(
        build_model("nano", 2),
        target,
        overwrite=True,
        metadata={"architecture": "ParagonSR", "form": "training", "note": "untrained demo"},
    )
    print(f"wrote {target}")
