"""sdtune: fine-tune Stable Diffusion 1.5 on medical images and measure what each strategy is worth."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns at import, on CPUs with AVX512-BF16, that an optional kernel
# package for 4-bit CPU inference is missing: nothing here uses it, and every command printed it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# diffusers 0.42 warns at every ModelMixin.to(dtype) that modules "should be kept in float32: []",
# even when the list is empty (nothing to keep, so nothing can go wrong): each training run and
# synthesis printed it per component. A warning that names modules still shows.
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage())

# The model every entry point loads unless told otherwise (the runwayml/ id was removed).
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
