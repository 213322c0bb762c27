"""sdtune: fine-tune Stable Diffusion 1.5 on medical images and measure what each strategy is worth."""

__version__ = "0.1.0"

# The model every entry point loads unless told otherwise (the runwayml/ id was removed).
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
