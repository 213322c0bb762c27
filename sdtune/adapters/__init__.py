"""Parameter-efficient fine-tuning of the U-Net behind one small interface.

    adapter = get_adapter("lora", AdapterConfig(lora_rank=8))
    unet.requires_grad_(False)
    adapter.apply(unet)                          # adds modules, marks exactly its params trainable
    optimizer = AdamW(adapter.param_groups(unet, lr))
    clip_grad_norm_(adapter.trainable_parameters(unet), 1.0)   # an explicit list
    adapter.save(unet, out_dir)                  # only the trained tensors
    adapter.load(fresh_unet, out_dir)            # strict: mismatched files are a UserError
    adapter.merge(unet)                          # a plain diffusers U-Net for final_model/

One file per method; a new method is one file, one line in ADAPTERS and one test row.
(The package is not called `peft`, so that it does not shadow the library it uses.)
"""

from __future__ import annotations

from sdtune.adapters.base import Adapter, AdapterConfig, check_config
from sdtune.adapters.bitfit import BitFit
from sdtune.adapters.difffit import DiffFit
from sdtune.adapters.lora import Dora, Lora

ADAPTERS: dict[str, type[Adapter]] = {
    "lora": Lora,
    "dora": Dora,
    "bitfit": BitFit,
    "difffit": DiffFit,
}


def get_adapter(name: str, cfg: AdapterConfig | None = None) -> Adapter:
    """The adapter called `name` (a key of ADAPTERS) with its settings checked."""
    if name not in ADAPTERS:
        raise ValueError(f"unsupported adapter {name!r}: choose one of {', '.join(ADAPTERS)}")
    cfg = cfg if cfg is not None else AdapterConfig()
    check_config(cfg)
    return ADAPTERS[name](cfg)


__all__ = ["ADAPTERS", "Adapter", "AdapterConfig", "get_adapter"]
