"""DiffFit (Xie et al. 2023, arXiv 2304.06648) for the SD U-Net.

DiffFit trains the bias terms, the norm parameters and new scale factors gamma (initialised to
1) that multiply residual-branch outputs: x + gamma * f(x). Here gamma sits on every
BasicTransformerBlock's self-attention (attn1), cross-attention (attn2) and feed-forward (ff)
branch, and with `difffit_resnets` on each ResnetBlock2D's branch (conv2's output, before the
skip add). Nothing full-size is added: ~0.056% of SD1.5's U-Net trains.

gamma is per channel (one scale per output feature, LayerScale-style): a scalar is the special
case of equal entries, the cost is only the block width (37,440 on SD1.5) and it still folds
exactly into the output projection, so merging leaves a plain U-Net.

Where: each branch ends in a Linear/Conv output projection (attn.to_out[0], ff.net[-1],
resnet.conv2) followed only by linear ops (dropout, division by rescale_output_factor); the
residual add happens in the block (BasicTransformerBlock.forward: `attn_output + hidden_states`;
ResnetBlock2D.forward: `input_tensor + hidden_states`), not inside Attention, as long as
`attn.residual_connection` is False (checked). So gamma is a parameter on that projection
(`...attn1.to_out.0.difffit_gamma`) and a forward hook scales the projection's output;
diffusers' forward code is not copied, and merging is gamma*(Wx+b) = (gamma W)x + gamma b.
"""

from __future__ import annotations

import torch
from torch import nn

from sdtune.adapters.base import Adapter
from sdtune.errors import UserError

GAMMA = "difffit_gamma"
NORMS = (nn.GroupNorm, nn.LayerNorm)


def _scale_by_gamma(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: output * gamma, per output channel (last dim for Linear, dim 1 for Conv2d)."""
    gamma = getattr(module, GAMMA).to(output.dtype)  # gamma stays fp32; the stream keeps its dtype
    if isinstance(module, nn.Conv2d):
        gamma = gamma.view(-1, 1, 1)
    return output * gamma


def residual_projections(unet: nn.Module, resnets: bool) -> dict[str, nn.Module]:
    """The output projection of every residual branch that gets a gamma, by module name."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    found = {}
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            for branch in ("attn1", "attn2"):
                attn = getattr(module, branch, None)
                if attn is None:
                    continue
                if getattr(attn, "residual_connection", False):
                    raise UserError(f"{name}.{branch} adds its residual inside Attention: DiffFit's gamma "
                                    f"would scale the skip path too (not an SD1.5 U-Net?)")
                found[f"{name}.{branch}.to_out.0"] = attn.to_out[0]
            linears = [(i, layer) for i, layer in enumerate(module.ff.net) if isinstance(layer, nn.Linear)]
            index, last = linears[-1]
            if not all(isinstance(layer, nn.Dropout) for layer in list(module.ff.net)[index + 1:]):
                raise UserError(f"{name}.ff has more than dropout after its last Linear: cannot place gamma")
            found[f"{name}.ff.net.{index}"] = last
        elif resnets and isinstance(module, ResnetBlock2D):
            found[f"{name}.conv2"] = module.conv2
    return found


class DiffFit(Adapter):
    name = "difffit"
    trains_norms_or_biases = True
    weights_name = "difffit_weights.safetensors"
    config_fields = ("difffit_resnets",)  # decides which gammas exist

    def apply(self, unet: nn.Module) -> None:
        if self.is_applied(unet):
            raise UserError("this U-Net already has DiffFit scales; apply DiffFit to a fresh U-Net")
        projections = residual_projections(unet, resnets=self.cfg.difffit_resnets)
        if not projections:
            raise UserError("no transformer blocks found in the U-Net: DiffFit has nowhere to put its scales")
        for module in projections.values():
            width = module.weight.shape[0]
            # fp32 even on an fp16 U-Net: trained tensors must stay fp32 under fp16 AMP
            module.register_parameter(GAMMA, nn.Parameter(torch.ones(width, device=module.weight.device)))
            module.register_forward_hook(_scale_by_gamma)
        for param in self.trainable_parameters(unet):
            param.requires_grad_(True)

    def is_applied(self, unet: nn.Module) -> bool:
        return any(hasattr(module, GAMMA) for module in unet.modules())

    def named_trainable(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        """gammas + every bias + every norm weight, in the U-Net's order."""
        norm_weights = {f"{name}.weight" for name, module in unet.named_modules()
                        if isinstance(module, NORMS) and module.weight is not None}
        return {name: param for name, param in unet.named_parameters()
                if name.endswith((f".{GAMMA}", ".bias")) or name in norm_weights}

    def gammas(self, unet: nn.Module) -> list[nn.Parameter]:
        return [param for name, param in unet.named_parameters() if name.endswith(f".{GAMMA}")]

    def param_groups(self, unet: nn.Module, lr: float) -> list[dict]:
        """gammas, DiffFit's own new scales, at lr x multiplier without weight decay, as DiffFit trains
        them (decay would pull them to 0, not to their initial 1); the pretrained biases and norms at lr
        with the study's AdamW decay, as BitFit's biases and every other strategy's tensors (at 1e-2 and
        lr 1e-4 it shrinks them by ~1e-6 a step: about 0.1% over 1000 steps)."""
        named = self.named_trainable(unet)
        scales = [param for name, param in named.items() if name.endswith(f".{GAMMA}")]
        rest = [param for name, param in named.items() if not name.endswith(f".{GAMMA}")]
        return [  # in this order for good: a checkpoint's optimizer state holds its groups by position
            {"params": scales, "lr": lr * self.cfg.difffit_scale_lr_multiplier, "weight_decay": 0.0,
             "name": "difffit_gamma"},
            {"params": rest, "lr": lr, "name": self.name},  # named as the method: the U-Net's own rate
        ]

    def merge(self, unet: nn.Module) -> nn.Module:
        """Fold gamma into the projection it scales: gamma*(Wx+b) = (gamma W)x + gamma b; remove hooks."""
        with torch.no_grad():
            for module in unet.modules():
                if not hasattr(module, GAMMA):
                    continue
                gamma = getattr(module, GAMMA).detach()
                shape = (-1,) + (1,) * (module.weight.dim() - 1)
                module.weight.mul_(gamma.to(module.weight.dtype).view(shape))
                if module.bias is not None:
                    module.bias.mul_(gamma.to(module.bias.dtype))
                for key, hook in list(module._forward_hooks.items()):
                    if hook is _scale_by_gamma:
                        del module._forward_hooks[key]
                delattr(module, GAMMA)
        return unet
