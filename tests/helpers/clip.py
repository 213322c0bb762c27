"""A tiny random CLIP (transformers CLIPModel + CLIPProcessor) in a local folder, for CLIP-score tests."""

from pathlib import Path

import torch


def write_tiny_clip(folder: Path, seed: int) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sdtune.tiny import build_clip_tokenizer

    torch.manual_seed(seed)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(text_config={**small, "max_position_embeddings": 77},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(folder)
    return folder
