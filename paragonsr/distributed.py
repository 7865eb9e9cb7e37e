"""Running under torchrun: which rank this process is, and the device and threads it should use.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here describes a single
process. CPU ranks split the machine's cores between them: OpenMP threads of several processes
competing for the same cores slowed training 15-30x.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str = "auto") -> torch.device:
        if requested not in ("auto", "cuda"):
            return torch.device(requested)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def cpu_threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.local_world)


def ranks() -> Ranks:
    env = os.environ
    return Ranks(
        rank=int(env.get("RANK", 0)),
        world=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world=int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))),
    )
