#!/usr/bin/env python
"""Make a synthetic dataset (PNG images + metadata.csv) with any trained model.

    accelerate launch synthesize_images.py --model-path outputs/lora --labels-csv labels.csv --output-dir synthetic/lora
    python synthesize_images.py --model-path outputs/final_model --prompts "prompt a, prompt b" --output-dir generated

`python synthesize_images.py --help` lists every option; the logic lives in sdtune.synthesis.
"""

from sdtune.errors import run_cli
from sdtune.synthesis import main

if __name__ == "__main__":
    run_cli(main)
