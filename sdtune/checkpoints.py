"""What a run's checkpoint-STEP/ folder holds, for training (resume) and synthesis (sampling from it) alike.

Only the trained tensors, in safetensors: `{component}_trained.safetensors` per trained component
(the adapter's tensors for a PEFT U-Net, every weight of a fully trained one), and with --use_ema
`ema.safetensors`, the EMA's shadow weights in the order of the run's trainable-parameter list.
accelerate adds the optimizer, scheduler and RNG states beside them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.errors import UserError

EMA_FILE = "ema.safetensors"
COUNTERS_FILE = "counters.json"


class StepCounters:
    """Counts over the whole run that a resume carries on (saved as JSON with each checkpoint)."""

    def __init__(self):
        self.skipped_steps = 0  # optimizer steps skipped for NaN/inf gradients
        self.nonfinite_in_a_row = 0
        self.resumes = 0
        # Training seconds of the run's earlier segments (before each resume): GPU-hours count the whole run.
        self.earlier_seconds = 0.0
        self.started = time.time()  # this segment's loop start (the loop sets it)

    def count(self, finite: bool) -> None:
        self.skipped_steps += not finite
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1

    def seconds(self) -> float:
        """The run's training time so far, over every segment (not the time lost after a kill's last checkpoint)."""
        return self.earlier_seconds + time.time() - self.started

    def state(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "resumes": self.resumes, "train_seconds": self.seconds()}

    def restore(self, saved: dict) -> None:
        """A checkpoint's counters, as a resume continues them (checkpoints from before a counter was saved: 0)."""
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(saved.get("nonfinite_in_a_row", 0))
        self.resumes = int(saved.get("resumes", 0)) + 1
        self.earlier_seconds = float(saved.get("train_seconds", 0.0))


def trained_file(folder: str | Path, component: str) -> Path:
    return Path(folder) / f"{component}_trained.safetensors"


def checkpoint_steps(output_dir: Path) -> list[int]:
    """The steps of a run's complete checkpoints, oldest first (.checkpoint-N.partial/ is not one)."""
    return sorted(int(m.group(1)) for p in output_dir.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))


def save_trained(params: dict[str, torch.nn.Parameter], path: Path) -> None:
    save_file({name: p.detach().contiguous() for name, p in params.items()}, path)


def load_trained(params: dict[str, torch.nn.Parameter], path: Path, fix: str) -> None:
    """A checkpoint's trained tensors into `params`: the same names and shapes, or a UserError ending in `fix`."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint was saved by a run that did not train this part; {fix}")
    state = load_file(path)
    if set(state) != set(params):
        missing, unexpected = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
        raise UserError(f"{path} does not match these trainable parameters (missing {missing}, unexpected "
                        f"{unexpected}): {fix}")
    wrong = [(n, tuple(state[n].shape), tuple(p.shape)) for n, p in params.items() if state[n].shape != p.shape]
    if wrong:  # another --lora_rank: the same names, other shapes
        name, saved, ours = wrong[0]
        raise UserError(f"{path}: {len(wrong)} tensors have another shape, e.g. {name} is {saved} there and {ours} "
                        f"here: {fix}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def save_ema(ema, path: Path) -> None:
    """EMA shadow weights in the order of the trainable-parameter list, its counters as metadata
    (safetensors, not accelerate's pickled custom-object file)."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({f"{i:06d}": t.detach().contiguous() for i, t in enumerate(shadow)}, path,
              metadata={"ema_state": json.dumps(state)})


def read_ema(path: Path, like: list[torch.Tensor], missing: str) -> tuple[list[torch.Tensor], dict]:
    """(shadow weights, EMA counters) saved by save_ema, checked against the tensors they stand for."""
    if not path.is_file():
        raise UserError(f"{path} is missing: {missing}")
    with safe_open(path, "pt") as f:
        state = json.loads((f.metadata() or {}).get("ema_state", "{}"))
        shadow = [f.get_tensor(k) for k in sorted(f.keys())]
    if len(shadow) != len(like) or any(a.shape != b.shape for a, b in zip(shadow, like)):
        raise UserError(f"{path} does not match this run's trainable parameters")
    return shadow, state


def load_ema(ema, path: Path) -> None:
    shadow, state = read_ema(path, ema.shadow_params, "this checkpoint was saved without --use_ema; resume without it")
    device = ema.shadow_params[0].device
    ema.load_state_dict({**state, "shadow_params": shadow})
    ema.to(device)  # the file loads onto the CPU; the EMA must stay beside the weights it follows


def trained_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trained tensors of a component, by name: all of a fully trained model, the adapter's otherwise."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def register_checkpoint_hooks(accelerator, models, ema=None, counters: StepCounters | None = None) -> None:
    """Make accelerate's save_state/load_state write and read the trained tensors and the EMA as above,
    instead of every model's full state dict and a pickled EMA, and the step counters as JSON."""
    from sdtune.loss import LatentEncoder
    from sdtune.strategies import COMPONENTS

    def component(model):  # accelerate hands over what it prepared: DDP-wrapped, the VAE inside its encoder
        model = accelerator.unwrap_model(model)
        model = model.vae if isinstance(model, LatentEncoder) else model
        return next((c, m) for c in COMPONENTS if (m := getattr(models, c)) is model)

    def save_hook(hook_models, weights, folder):
        if accelerator.is_main_process:
            for model in hook_models:
                name, module = component(model)
                save_trained(trained_params(module), trained_file(folder, name))
            if ema is not None:
                save_ema(ema, Path(folder) / EMA_FILE)
            if counters is not None:
                (Path(folder) / COUNTERS_FILE).write_text(json.dumps(counters.state()))
        weights.clear()  # nothing else of the models is saved

    def load_hook(hook_models, folder):
        while hook_models:
            name, module = component(hook_models.pop())
            load_trained(trained_params(module), trained_file(folder, name),
                         "resume with the strategy and adapter settings it was saved with")
        if ema is not None:
            load_ema(ema, Path(folder) / EMA_FILE)
        saved = Path(folder) / COUNTERS_FILE
        if counters is not None:
            counters.restore(json.loads(saved.read_text()) if saved.is_file() else {})

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
