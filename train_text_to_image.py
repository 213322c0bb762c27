#!/usr/bin/env python
"""Fine-tune Stable Diffusion 1.5 on medical images with any of the study's eleven strategies.

    accelerate launch train_text_to_image.py --strategy lora --train_data_dir data/ --output_dir outputs/lora

`python train_text_to_image.py --help` lists every option; the logic lives in sdtune.train.
"""

from sdtune.errors import run_cli
from sdtune.train import main

if __name__ == "__main__":
    run_cli(main)
