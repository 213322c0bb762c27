"""The fine-tuning strategies of "Pixels Under Pressure" (TehraniNasab et al., MICCAI-W 2025) as one table.

A strategy says which of SD1.5's three components train and how: `unet` is None (frozen),
"full", or the name of a PEFT adapter (sdtune.adapters); the text encoder and the VAE are
either fully trained or frozen. Default learning rates are the study's. A twelfth strategy is
one more row here; its shell wrappers (NAME.sh, synthesis_NAME.sh) and run_study.sh's default list
are what a user runs, so they get one line each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPONENTS = ("unet", "text_encoder", "vae")


@dataclass(frozen=True)
class Strategy:
    name: str
    unet: str | None = None  # None: frozen; "full"; or an adapter name ("lora", "dora", "bitfit", "difffit")
    text_encoder: bool = False
    vae: bool = False
    # The study's learning rates (Pixels Under Pressure); the text encoder's drops to 1e-6
    # when it trains together with the U-Net.
    unet_lr: float = 1e-5
    text_encoder_lr: float = 5e-6
    vae_lr: float = 1e-6
    description: str = ""

    @property
    def trains(self) -> dict[str, bool]:
        return {"unet": self.unet is not None, "text_encoder": self.text_encoder, "vae": self.vae}

    @property
    def full(self) -> dict[str, bool]:
        """Components whose every weight trains (an adapter-carrying U-Net is not one)."""
        return {"unet": self.unet == "full", "text_encoder": self.text_encoder, "vae": self.vae}

    @property
    def peft(self) -> str | None:
        return self.unet if self.unet not in (None, "full") else None


PEFT_LR = 1e-4
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("unet", unet="full", description="U-Net fully fine-tuned"),
        Strategy("text", text_encoder=True, description="text encoder fully fine-tuned"),
        Strategy("vae", vae=True, description="VAE fully fine-tuned"),
        Strategy("unet+text", unet="full", text_encoder=True, text_encoder_lr=1e-6, description="U-Net and text encoder"),
        Strategy("unet+vae", unet="full", vae=True, description="U-Net and VAE"),
        Strategy("vae+text", text_encoder=True, vae=True, description="VAE and text encoder"),
        Strategy("unet+vae+text", unet="full", text_encoder=True, vae=True, text_encoder_lr=1e-6,
                 description="all three components"),
        Strategy("lora", unet="lora", unet_lr=PEFT_LR, description="LoRA on the U-Net's attention (Hu et al. 2022)"),
        Strategy("dora", unet="dora", unet_lr=PEFT_LR, description="DoRA on the U-Net's attention (Liu et al. 2024)"),
        Strategy("bitfit", unet="bitfit", unet_lr=PEFT_LR, description="U-Net bias terms only (Ben Zaken et al. 2022)"),
        Strategy("difffit", unet="difffit", unet_lr=PEFT_LR,
                 description="U-Net scales, biases and norms (Xie et al. 2023)"),
    ]
}


def resolve_strategy(
    name: str | None = None,
    train_unet: bool = False,
    train_text_encoder: bool = False,
    train_vae: bool = False,
    peft: str | None = None,
) -> Strategy:
    """A named row of the table, or a custom one composed from explicit flags (not both)."""
    custom = train_unet or train_text_encoder or train_vae or peft is not None
    if name and custom:
        raise ValueError("give either --strategy or the --train_*/--peft flags, not both")
    if name:
        if name not in STRATEGIES:
            raise ValueError(f"unsupported strategy {name!r}: use one of {', '.join(STRATEGIES)}")
        return STRATEGIES[name]
    if not custom:
        raise ValueError("nothing to train: give --strategy (e.g. --strategy lora) or --train_unet/--train_text_encoder/--train_vae/--peft")
    if train_unet and peft:
        raise ValueError("--train_unet trains the whole U-Net; --peft trains an adapter on it: choose one")
    unet = "full" if train_unet else peft
    parts = [part for part, on in (("unet" if train_unet else peft, unet), ("vae", train_vae), ("text", train_text_encoder)) if on]
    name = "+".join(parts)
    if name in STRATEGIES:
        return STRATEGIES[name]
    return Strategy(name, unet=unet, text_encoder=train_text_encoder, vae=train_vae,
                    unet_lr=PEFT_LR if peft else 1e-5, text_encoder_lr=1e-6 if unet else 5e-6,
                    description="custom combination")


def count_parameters(params: list[torch.nn.Parameter]) -> int:
    # Parameters are counted once even if a module shares them (tied weights).
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def apply_strategy(models, strategy: Strategy, adapter=None) -> dict[str, dict[str, torch.nn.Parameter]]:
    """Freeze every component, then unfreeze what `strategy` trains (applying `adapter`, its PEFT method,
    to the U-Net): {component: {name: parameter}} in the model's order, empty for a frozen one."""
    for c in COMPONENTS:
        getattr(models, c).requires_grad_(False)
    named = {}
    for c in COMPONENTS:
        model = getattr(models, c)
        if c == "unet" and adapter is not None:
            adapter.apply(model)  # marks exactly its own parameters trainable
            named[c] = adapter.named_trainable(model)
        elif strategy.trains[c]:
            model.requires_grad_(True)
            named[c] = dict(model.named_parameters())
        else:
            named[c] = {}
    return named
