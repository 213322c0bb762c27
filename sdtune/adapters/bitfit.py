"""BitFit (Ben Zaken et al. 2022, arXiv 2106.10199): train only the U-Net's bias terms."""

from __future__ import annotations

import torch

from sdtune.adapters.base import Adapter


def named_biases(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every bias of the U-Net: Linear, Conv, GroupNorm and LayerNorm (343,684 on SD1.5)."""
    return {name: param for name, param in unet.named_parameters() if name.endswith(".bias")}


class BitFit(Adapter):
    name = "bitfit"
    trains_norms_or_biases = True
    weights_name = "bitfit_weights.safetensors"

    def apply(self, unet: torch.nn.Module) -> None:
        for param in self.trainable_parameters(unet):
            param.requires_grad_(True)

    def named_trainable(self, unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return named_biases(unet)

    def is_applied(self, unet: torch.nn.Module) -> bool:
        # Nothing is added: "applied" only means the biases are marked trainable.
        return all(param.requires_grad for param in self.trainable_parameters(unet))

    def merge(self, unet: torch.nn.Module) -> torch.nn.Module:
        return unet  # the trained biases already are the U-Net's weights
