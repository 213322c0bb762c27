"""Launched by tests/test_distributed.py under `accelerate launch`: each rank writes the dataset
indices it is given for one epoch, through the training script's own accelerator and loader."""

import json
import sys
from pathlib import Path

from sdtune.data.dataset import ImageCaptionDataset, load_examples
from sdtune.strategies import resolve_strategy
from sdtune.train import make_accelerator, make_dataloader, parse_args

cfg, data, _ = parse_args(sys.argv[1:])
accelerator = make_accelerator(cfg, resolve_strategy(cfg.strategy))
loader = accelerator.prepare(make_dataloader(ImageCaptionDataset(load_examples(data), data.resolution), cfg))
indices = [i for batch in loader for i in batch["indices"]]
Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
(Path(cfg.output_dir) / f"rank{accelerator.process_index}.json").write_text(json.dumps(indices))
