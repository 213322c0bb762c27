#!/usr/bin/env python
"""Evaluate generated images: FID, KID, Vendi, MS-SSIM diversity and CLIP score.

    python evaluate.py --real data/CheXpert-v1.0-small/valid.csv --fake synthetic/lora --output results.json

`python evaluate.py --help` lists every option; the logic lives in sdtune.evaluation.
"""

from sdtune.errors import run_cli
from sdtune.evaluation.cli import main

if __name__ == "__main__":
    run_cli(main)
