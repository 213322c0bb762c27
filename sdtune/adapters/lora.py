"""LoRA (Hu et al. 2021, arXiv 2106.09685) and DoRA (Liu et al. 2024, arXiv 2402.09353) via peft.

One class for both: DoRA is LoRA plus one learned magnitude per output feature (`use_dora`).
Files are diffusers' `pytorch_lora_weights.safetensors`, so `StableDiffusionPipeline.
load_lora_weights(out_dir)` reads them; the peft config (rank, alpha, DoRA, targets) travels in
the file's metadata, without which diffusers would assume alpha = rank.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from sdtune.adapters.base import Adapter, AdapterConfig, check_keys, read_weights
from sdtune.errors import UserError

ADAPTER_NAME = "default"  # peft's adapter name; diffusers uses it too
UNET_PREFIX = "unet."  # diffusers' pipeline-level LoRA files prefix U-Net keys with this


class Lora(Adapter):
    name = "lora"
    use_dora = False
    weights_name = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
    can_stay_unmerged = True  # peft's layers run unmerged; merging (--fuse_lora, default) is faster

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=list(self.cfg.lora_target_modules),
            init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the U-Net is unchanged at step 0
            use_dora=self.use_dora,  # DoRA's magnitude starts at the weight's column norms: also unchanged
        )

    def apply(self, unet: torch.nn.Module) -> None:
        if self.is_applied(unet):
            raise UserError("this U-Net already has a LoRA/DoRA adapter; apply it to a fresh U-Net")
        unet.add_adapter(self.peft_config(), adapter_name=ADAPTER_NAME)
        if self.use_dora and self.cfg.dora_fast:
            use_fast_dora(unet)
        if not self.named_trainable(unet):
            raise UserError(f"no U-Net module matches lora_target_modules {self.cfg.lora_target_modules}")
        # peft marks the adapter trainable and freezes the rest of the U-Net; say so explicitly.
        for param in self.trainable_parameters(unet):
            param.requires_grad_(True)

    def is_applied(self, unet: torch.nn.Module) -> bool:
        return bool(getattr(unet, "peft_config", None))

    def named_trainable(self, unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        # lora_A / lora_B (and DoRA's lora_magnitude_vector) of the "default" adapter
        return {name: param for name, param in unet.named_parameters() if ".lora_" in name}

    def state_dict(self, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
        """peft's keys (`...to_q.lora_A.weight`, `...to_q.lora_magnitude_vector`), no adapter name."""
        from peft.utils import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
        return {key: value.detach() for key, value in tensors.items()}

    def save(self, unet: torch.nn.Module, out_dir: str | Path) -> Path:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        out_dir = Path(out_dir)
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(self.state_dict(unet)),
            unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
        )
        return out_dir / self.weights_name

    def load(self, unet: torch.nn.Module, path: str | Path) -> None:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        if not self.is_applied(unet):
            self.apply(unet)
        tensors, meta = read_weights(path, self.weights_name)
        if tensors and not all(key.startswith(UNET_PREFIX) for key in tensors):
            raise UserError(f"{path} is not a U-Net LoRA file in diffusers' format (keys must start with 'unet.')")
        self._check_saved_config(meta, path)
        saved = convert_unet_state_dict_to_peft({key[len(UNET_PREFIX):]: value for key, value in tensors.items()})
        check_keys(self.state_dict(unet), saved, path)
        result = set_peft_model_state_dict(unet, saved, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:  # cannot happen after check_keys; kept as the strict-load check
            unused = result.unexpected_keys
            raise UserError(f"{path}: peft did not use {len(unused)} keys, e.g. {unused[0]}")

    def _check_saved_config(self, meta: dict[str, str], path: str | Path) -> None:
        """Rank shows in shapes, but alpha and DoRA do not: compare the peft config stored in the file."""
        if "lora_adapter_metadata" not in meta:
            return  # files from other tools: shapes are still checked, alpha is taken from our settings
        saved = json.loads(meta["lora_adapter_metadata"])
        saved = {key[len(UNET_PREFIX):]: value for key, value in saved.items() if key.startswith(UNET_PREFIX)}
        ours = {
            "r": self.cfg.lora_rank,
            "lora_alpha": self.cfg.lora_alpha,
            "use_dora": self.use_dora,
            "target_modules": sorted(self.cfg.lora_target_modules),
        }
        theirs = {key: saved.get(key) for key in ours}
        if isinstance(theirs["target_modules"], list):
            theirs["target_modules"] = sorted(theirs["target_modules"])
        differ = [key for key in ours if theirs[key] != ours[key]]
        if differ:
            detail = ", ".join(f"{key}={theirs[key]!r} in the file but {ours[key]!r} now" for key in differ)
            raise UserError(f"{path} was saved with other LoRA settings ({detail}): pass the file's settings "
                            f"(use_dora=True means a DoRA file)")

    def merge(self, unet: torch.nn.Module) -> torch.nn.Module:
        """peft's merge (W += scale * B A, or DoRA's magnitude/direction), then drop the peft layers."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        unet.fuse_lora(lora_scale=1.0, safe_fusing=True)  # safe: raises instead of writing NaNs
        unet.unload_lora()  # replaces each peft layer with its (now merged) base layer
        left = [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]
        if left:
            raise RuntimeError(f"peft layers left after merging: {left[:3]}")
        return unet


def settings_from_metadata(meta: dict[str, str]) -> tuple[str, AdapterConfig] | None:
    """("lora" or "dora", the settings) stored in a diffusers LoRA file's peft metadata; None without it."""
    if "lora_adapter_metadata" not in meta:
        return None
    saved = json.loads(meta["lora_adapter_metadata"])
    kind = "dora" if saved.get("unet.use_dora") else "lora"
    return kind, AdapterConfig(lora_rank=saved["unet.r"], lora_alpha=saved["unet.lora_alpha"],
                               lora_dropout=saved.get("unet.lora_dropout", 0.0),
                               lora_target_modules=list(saved["unet.target_modules"]))


def use_fast_dora(model: torch.nn.Module) -> int:
    """Run peft's DoRA Linear layers through FastDoraLinearVariant; returns how many were switched."""
    from peft.tuners.lora.variants import DoraLinearVariant

    switched = 0
    for module in model.modules():
        variants = getattr(module, "lora_variant", {})
        for adapter, variant in variants.items():
            if type(variant) is DoraLinearVariant:  # exactly peft's Linear DoRA; conv DoRA is left alone
                variants[adapter] = fast_dora_variant()()
                switched += 1
    return switched


@functools.cache
def fast_dora_variant() -> type:
    """The class FastDoraLinearVariant, built on first use (peft is imported lazily, as above)."""
    from peft.tuners.lora.variants import DoraLinearVariant
    from peft.utils.integrations import dequantize_module_weight

    class FastDoraLinearVariant(DoraLinearVariant):
        """peft's DoRA Linear forward, the same maths with less work per step (issue 7; bench/dora_overhead.py).

        With y = W x + b from the base layer and scale = m / ||W + s B A|| (per output feature, detached
        as in the DoRA paper, 4.3), peft returns y + (scale - 1)(y - b) + scale s B A x: it builds B A by
        pushing an identity matrix of size in_features through A and B (with autograd), then spends
        five activation-sized products and sums. Here B A is one small matmul without autograd and the
        output is scale (y - b + s B A x) + b: one sum and one product (plus the bias on to_out.0).
        fp32: equal to peft's to ~1e-7; under autocast the sum is rounded once in the half dtype, which
        keeps the error of outputs and gradients at peft's own level (bench "err", tests).
        Init, merging, unmerging and saving are peft's, inherited unchanged.
        """

        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            dropout = module.lora_dropout[active_adapter]
            if module.training and not isinstance(dropout, torch.nn.Identity):
                # with dropout, peft recomputes W x on the dropped-out input: keep its path
                return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
            lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
            scaling, dora = module.scaling[active_adapter], module.lora_magnitude_vector[active_adapter]
            base = module.get_base_layer()
            dtype = lora_A.weight.dtype  # peft uses x's, which its Linear.forward has cast to this one
            # No gradient through the norm, as in peft; and no autocast: its cached half copy of a weight cast
            # under no_grad would carry no grad_fn into lora_B(lora_A(x)) below (pytorch#112583: torch 2.10 and older).
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                lora_weight = (lora_B.weight @ lora_A.weight).to(dtype)
                # A plain base weight is used as it is: peft's dequantize check is a torch.compile graph break.
                weight = base.weight if type(base.weight) is torch.nn.Parameter else dequantize_module_weight(base)
                weight = weight.to(dtype)
                weight_norm = dora.get_weight_norm(weight, lora_weight, scaling, adapter_name=active_adapter)
            scale = (dora.weight / weight_norm).view(1, -1)
            base_result = result if base.bias is None else result - base.bias
            out = scale * torch.add(base_result, lora_B(lora_A(x)), alpha=scaling)
            return out if base.bias is None else out + base.bias

    return FastDoraLinearVariant


class Dora(Lora):
    """DoRA: the same peft layers with `use_dora=True` (one magnitude per output feature)."""

    name = "dora"
    use_dora = True
