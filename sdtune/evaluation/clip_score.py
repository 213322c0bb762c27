"""CLIP score (Hessel et al. 2021) of images against their prompts, through torchmetrics' CLIPScore.

torchmetrics' definition: max(100 * mean cosine(image embedding, text embedding), 0). The model is
a Hugging Face CLIP (a hub id such as openai/clip-vit-large-patch14, or a local folder with a
CLIPModel and CLIPProcessor) or an open_clip model such as BiomedCLIP (`hf-hub:ID` or
`local-dir:PATH`). Either way it reaches CLIPScore as the (model, processor) pair its
callable argument accepts, so the score is torchmetrics' own computation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from sdtune.errors import UserError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


class ClipUnavailable(UserError):
    """The CLIP model cannot be loaded (offline without weights, bad folder): the score is skipped."""


class _HFCLIP(nn.Module):
    """A transformers CLIPModel whose get_*_features return tensors: transformers 5 returns output
    objects (projected embeddings in pooler_output), which torchmetrics 1.9 cannot normalise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config  # CLIPScore reads text_config.max_position_embeddings to truncate

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class _HFCLIPProcessor:
    """A CLIPProcessor that truncates captions to the text model's positions with the end-of-text
    token kept: torchmetrics 1.9 tokenizes without truncation and slices longer ids at 77, dropping
    that token, where CLIP pools its text embedding (every long caption would score alike)."""

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, images=None, text=None, **kwargs) -> dict:
        if text is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        given = {name: value for name, value in (("images", images), ("text", text)) if value is not None}
        return self.processor(**given, **kwargs)


class _OpenCLIP(nn.Module):
    """An open_clip model behind the two methods CLIPScore calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace()  # no text_config: open_clip's tokenizer already truncates

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.encode_text(input_ids)


class _OpenCLIPProcessor:
    """open_clip's image transform and tokenizer, called the way CLIPScore calls a CLIPProcessor."""

    def __init__(self, preprocess, tokenizer):
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __call__(self, images=None, text=None, **kwargs) -> dict:
        from torchvision.transforms.functional import to_pil_image

        if images is not None:
            return {"pixel_values": torch.stack([self.preprocess(to_pil_image(image.cpu())) for image in images])}
        ids = self.tokenizer(text)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@contextlib.contextmanager
def hub_offline(on: bool = True):
    """Nothing inside reaches the Hugging Face hub: huggingface_hub's own switch (which transformers
    and open_clip read at each request) is on for the duration."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def load_clip(name: str | None = None):
    """(model, processor) for CLIPScore; ClipUnavailable (one line) when it cannot be loaded.

    name None: DEFAULT_CLIP from the local Hugging Face cache only. A model is downloaded only
    when its hub id is asked for by name.
    """
    cache_only, name = not name, name or DEFAULT_CLIP  # "" (an empty wrapper variable) is the default too
    is_local = name.startswith("local-dir:") or Path(name).expanduser().exists()
    try:
        # A local model stays local: open_clip would fetch an HF text tower's config by its hub id.
        with hub_offline(is_local or cache_only):
            local = Path(name).expanduser()
            if name.startswith(("hf-hub:", "local-dir:")) or (local / "open_clip_config.json").is_file():
                import open_clip

                spec = name if name.startswith(("hf-hub:", "local-dir:")) else f"local-dir:{local}"
                model, preprocess = open_clip.create_model_from_pretrained(spec)
                return _OpenCLIP(model.eval()), _OpenCLIPProcessor(preprocess, open_clip.get_tokenizer(spec))
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(name).eval()
            positions = model.config.text_config.max_position_embeddings
            return _HFCLIP(model), _HFCLIPProcessor(CLIPProcessor.from_pretrained(name), positions)
    except Exception as err:  # hub, file and config errors all mean the same here: no model
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        if is_local and ("offline" in str(err).lower() or "local_files_only" in str(err)):
            raise ClipUnavailable(f"CLIP model {name} is local, but it names a hub model it is built from (e.g. "
                                  "BiomedCLIP's text tower) that is not in the local Hugging Face cache: load it "
                                  "once online with hf-hub:ID, or use a CLIP folder that holds everything") from None
        if cache_only and not offline:
            raise ClipUnavailable(f"CLIP model {name} (the default) is not in the local Hugging Face cache, and a "
                                  f"default is never downloaded: pass --clip_model {name} to download it, or a "
                                  "local CLIP folder") from None
        if offline and not is_local:
            raise ClipUnavailable(f"CLIP model {name} is not in the local Hugging Face cache and downloads are off "
                                  "(HF_HUB_OFFLINE=1): download it once online, or pass --clip_model a local CLIP "
                                  "folder") from None
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ClipUnavailable(f"cannot load CLIP model {name}: {detail}") from None


@torch.inference_mode()
def clip_score(images, captions: list[str], name: str | None = None, batch_size: int = 32, device: str = "cpu",
               model_and_processor=None, all_processes: bool = True) -> dict:
    """CLIP score of uint8 (3, H, W) images (a list, or a loader `images(i)`) against their captions.

    Under `accelerate launch` each process scores every num_processes-th image, and torchmetrics
    sums the scores and counts of all processes at compute(); `all_processes=False` scores alone.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    from sdtune.processes import process_state

    state = process_state()
    processes, rank = (state.num_processes, state.process_index) if all_processes else (1, 0)
    model, processor = model_and_processor or load_clip(name)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor), sync_on_compute=processes > 1).to(device)
    load = images if callable(images) else images.__getitem__
    mine = range(rank, len(captions), processes)
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        metric.update([load(i).to(device) for i in indices], [captions[i] for i in indices])
    return {"value": float(metric.compute()), "n": len(captions), "model": name or DEFAULT_CLIP}
