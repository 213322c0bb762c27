#!/usr/bin/env python
"""Does synthetic data help a classifier? Four arms (all real, N real per class, plus synthetic,
synthetic only), AUROC per label on a held-out real test set split by patient.

    python downstream.py --real data/CheXpert-v1.0-small/train.csv --synthetic synthetic/lora --output-dir outputs/lora/downstream

`python downstream.py --help` lists every option; the logic lives in sdtune.downstream.
"""

from sdtune.downstream import main
from sdtune.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
