"""What every PEFT method shares: its settings, its small interface, and strict weight files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.config import check_bounds, field
from sdtune.errors import UserError


@dataclass
class AdapterConfig:
    """PEFT settings for the U-Net (LoRA, DoRA, BitFit, DiffFit); each method reads its own fields."""

    lora_rank: int = field(4, "LoRA/DoRA rank r (toolkit default 4; the paper's runs use 8)", bounds=">=1")
    lora_alpha: float = field(16.0, "LoRA/DoRA alpha; the update is scaled by alpha / rank", bounds=">0")
    lora_dropout: float = field(0.0, "dropout on the LoRA/DoRA input, 0 to 1", bounds="0..<1")
    lora_target_modules: list[str] = field(
        ["to_q", "to_k", "to_v", "to_out.0"], "U-Net module names that get LoRA/DoRA (the attention projections)"
    )
    dora_fast: bool = field(
        True, "DoRA: the toolkit's faster training forward (same maths as peft's; false runs peft's own)"
    )
    difffit_scale_lr_multiplier: float = field(
        10.0, "DiffFit: learning rate of the scale factors gamma = lr x this (Xie et al. 2023 find ~10x best)",
        bounds=">0")
    difffit_resnets: bool = field(False, "DiffFit: also scale each ResNet block's residual branch (conv2 output)")


def check_config(cfg: AdapterConfig) -> None:
    """Fail at set-up, not at step 1, on settings no method can use."""
    check_bounds(cfg)
    if not cfg.lora_target_modules:
        raise UserError("lora_target_modules is empty: name at least one module (e.g. to_q to_k to_v to_out.0)")


class Adapter:
    """One PEFT method on a U-Net. `apply` once, then train `trainable_parameters(unet)`.

    Subclasses define `name`, `weights_name`, `apply`, `named_trainable` and `merge`; the
    defaults below cover methods whose trained tensors are plain named parameters of the U-Net.
    """

    name: str
    weights_name: str  # file written by save() inside out_dir
    config_fields: tuple[str, ...] = ()  # AdapterConfig fields that change the saved tensors
    trains_norms_or_biases = False  # fp32 trained tensors inside half-precision layers: needs GPU autocast
    can_stay_unmerged = False  # synthesis may sample through the adapter's layers (--fuse_lora false)

    def __init__(self, cfg: AdapterConfig):
        self.cfg = cfg

    def apply(self, unet: torch.nn.Module) -> None:
        """Add the method's modules/params to a frozen U-Net and set requires_grad on exactly those."""
        raise NotImplementedError

    def named_trainable(self, unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The method's parameters by name, in the U-Net's order (selected by name, not requires_grad)."""
        raise NotImplementedError

    def merge(self, unet: torch.nn.Module) -> torch.nn.Module:
        """Fold the adapter into the base weights; a plain diffusers U-Net remains."""
        raise NotImplementedError

    def trainable_parameters(self, unet: torch.nn.Module) -> list[torch.nn.Parameter]:
        """An explicit list (never an iterator): the optimizer, clipping and counting share it."""
        return list(self.named_trainable(unet).values())

    def param_groups(self, unet: torch.nn.Module, lr: float) -> list[dict]:
        """Optimizer parameter groups; one group at `lr`, named as the method, unless the method needs more."""
        return [{"params": self.trainable_parameters(unet), "lr": lr, "name": self.name}]

    def state_dict(self, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Only the trained tensors, detached."""
        return {key: param.detach() for key, param in self.named_trainable(unet).items()}

    def metadata(self) -> dict[str, str]:
        """Written into the weights file so a mismatched load can say what the file holds."""
        settings = {key: value for key, value in asdict(self.cfg).items() if key in self.config_fields}
        return {"sdtune_adapter": self.name, "sdtune_adapter_config": json.dumps(settings, sort_keys=True)}

    def save(self, unet: torch.nn.Module, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / self.weights_name
        tensors = {key: value.contiguous().cpu() for key, value in self.state_dict(unet).items()}
        save_file(tensors, str(path), metadata={"format": "pt", **self.metadata()})
        return path

    def load(self, unet: torch.nn.Module, path: str | Path) -> None:
        """Put saved weights onto a base U-Net (applies the adapter first if needed); strict."""
        if not self.is_applied(unet):
            self.apply(unet)
        tensors, meta = read_weights(path, self.weights_name)
        saved_method = meta.get("sdtune_adapter")
        if saved_method != self.name:
            raise UserError(f"{path} holds {saved_method or 'unknown'} weights, not {self.name}: "
                            f"load it with the adapter it was trained with")
        saved_config = json.loads(meta.get("sdtune_adapter_config", "{}"))
        ours = {key: value for key, value in asdict(self.cfg).items() if key in self.config_fields}
        differ = {key: (saved_config.get(key), value) for key, value in ours.items() if saved_config.get(key) != value}
        if differ:
            detail = ", ".join(f"{key}={saved!r} in the file but {now!r} now" for key, (saved, now) in differ.items())
            raise UserError(f"{path} was saved with other {self.name} settings ({detail}): pass the file's settings")
        copy_checked(self.named_trainable(unet), tensors, path)

    def is_applied(self, unet: torch.nn.Module) -> bool:
        return False


def read_weights(path: str | Path, default_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; `path` may be the file or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise UserError(f"adapter weights {path} not found (save() writes {default_name} into its folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"cannot read adapter weights {path}: {err}") from None


def check_keys(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], path: str | Path) -> None:
    """Same keys and shapes, or a UserError naming a few of the differences."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{path} does not match this adapter on this U-Net: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]} "
            f"(was it saved for another method, model or setting?)"
        )
    wrong = [(key, tuple(saved[key].shape), tuple(expected[key].shape))
             for key in expected if saved[key].shape != expected[key].shape]
    if wrong:
        key, got, want = wrong[0]
        raise UserError(f"{path}: {len(wrong)} tensors have the wrong shape, e.g. {key} is {got}, expected {want} "
                        f"(saved with another rank or model?)")


def copy_checked(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], path: str | Path) -> None:
    check_keys(params, saved, path)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(saved[key])
