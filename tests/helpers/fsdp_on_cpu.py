"""Launched by tests/test_distributed.py: the training script under accelerate's FSDP, on CPU processes.

accelerate turns FSDP on only for accelerator devices, while torch's FSDP2 itself shards over gloo
on CPUs. Declaring the gloo processes a multi-device run on the CPU puts accelerate in FSDP mode
here as it would be on GPUs.
"""

import sys

import torch
from accelerate import state
from accelerate.utils import DistributedType


def _backend(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


def _device(self):
    self.device = torch.device("cpu")


state.PartialState._prepare_backend = _backend
state.PartialState.set_device = _device
torch.distributed.init_process_group("gloo")

from sdtune.errors import run_cli  # noqa: E402
from sdtune.train import main  # noqa: E402

sys.argv[0] = "train_text_to_image.py"
run_cli(main)
