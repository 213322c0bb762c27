"""Launched by tests/test_distributed.py: features of an image set, in as many processes as launched."""

import sys

import torch
from accelerate import PartialState

from sdtune.evaluation.features import extract_features, get_extractor
from sdtune.evaluation.images import load_image_set

images, module, out = sys.argv[1:4]
feats = extract_features(get_extractor(module, input_size=32), load_image_set(images).items, batch_size=5)
if PartialState().is_main_process:
    torch.save(feats, out)
