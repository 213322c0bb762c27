"""The processes `accelerate launch` started, kept one group on a machine without CUDA."""

from __future__ import annotations

import os

import torch


def launched_without_cuda() -> bool:
    """Several processes launched where CUDA is missing. accelerate would then leave each one on its
    own, every one doing the whole job into the same output; cpu=True joins them over gloo instead."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's PartialState of this launch (one process when not launched), CPU processes joined."""
    from accelerate import PartialState

    return PartialState(cpu=launched_without_cuda())
