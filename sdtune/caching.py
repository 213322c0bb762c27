"""Encode once what does not train: VAE latents and caption embeddings, before the loop.

A frozen VAE gives the same latent distribution for an image every epoch, so its moments
(mean and log-variance, diffusers' `latent_dist.parameters`) are computed once; each step then
draws the latent from them with the sample's own generator, exactly as encoding would. A frozen
text encoder gives the same embedding for a caption, so each distinct caption (and the empty
prompt of caption dropout) is encoded once. The VAE costs about 30% of a full-U-Net step at
512 px (the reference recipe's H100 figures, BENCHMARKS.md); after caching it leaves the GPU.

Latents live in memory, or on disk with `--latent_cache_dir`: one safetensors file per image,
named by a hash of (file, size, mtime, preprocessing, VAE, the decoding code), so later runs on
the same data (the other strategies of a study) reuse them and no file name carries a patient
identifier.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset

from sdtune.data.records import file_stamp
from sdtune.errors import UserError
from sdtune.provenance import code_digest

# The code between an image file and its latent moments: a cache on disk outlives the toolkit version
# that wrote it, so an update that decodes, crops or encodes differently must not read it.
LATENT_CODE = ("sdtune.data.images", "sdtune.data.dataset", "sdtune.caching")
MEMORY_LIMIT_BYTES = 8 * 2**30  # above this, latents go to disk (OUTPUT_DIR/latent_cache) instead of RAM,
# and caption embeddings (one per distinct caption, e.g. free-text reports) are encoded every step instead


def sample_latents(moments: torch.Tensor, generators, scaling_factor: float) -> torch.Tensor:
    """Latents drawn from cached VAE moments: the same draw as `vae.encode(x).latent_dist.sample(generators)`."""
    return DiagonalGaussianDistribution(moments).sample(generator=generators) * scaling_factor


def vae_fingerprint(vae) -> str:
    """Identifies what makes latents (the encoder's weights and the config), so a cache never outlives
    them: any changed encoder tensor re-encodes (SD's encoder: about 34M parameters, a fraction of a second)."""
    # Not the config's _name_or_path: a copied or moved model keeps its cache.
    digest = hashlib.sha256(repr(sorted((k, v) for k, v in vae.config.items() if not k.startswith("_"))).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def image_key(path: str | Path, preprocessing: str) -> str:
    return hashlib.sha256(f"{file_stamp(path)}|{preprocessing}".encode()).hexdigest()[:32]


def _pixels_and_indices(batch: list[dict]):  # a module-level function: worker processes may need to pickle it
    return torch.stack([x["pixel_values"] for x in batch]), [x["index"] for x in batch]


@torch.no_grad()
def _encode(vae, dataset, indices: list[int], accelerator, dtype, batch_size: int, workers: int):
    """Yield (dataset indices, moments on the CPU) for `indices`, encoded in batches on this process's device."""
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=workers,
                        pin_memory=accelerator.device.type == "cuda", collate_fn=_pixels_and_indices)
    for pixels, batch_indices in loader:
        with accelerator.autocast():  # as the loop encodes: half-precision VAE under autocast
            moments = vae.encode(pixels.to(accelerator.device, dtype=dtype)).latent_dist.parameters
        yield batch_indices, moments


def cache_latents(vae, dataset, accelerator, dtype, batch_size: int, workers: int = 0,
                  cache_dir: str | Path | None = None, preprocessing: str = "") -> "LatentStore":
    """Encode every image of `dataset` once, the work split across processes. Returns the store
    the training dataset reads moments from (in memory, or files in cache_dir)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{preprocessing}|{vae_fingerprint(vae)}|{dtype}|{code_digest(*LATENT_CODE)}"
        paths = [cache_dir / f"{image_key(ex.image, tag)}.safetensors" for ex in dataset.examples]
        missing = [i for i in range(len(paths)) if i % world == rank and not paths[i].is_file()]
        bad = []
        for batch_indices, moments in _encode(vae, dataset, missing, accelerator, dtype, batch_size, workers):
            for i, m in zip(batch_indices, moments.cpu()):
                if not torch.isfinite(m).all():
                    bad.append(i)  # never cached: a later run must not reuse it
                    continue
                partial = paths[i].with_suffix(".partial")
                save_file({"moments": m.contiguous()}, partial)
                partial.replace(paths[i])  # a crash never leaves half a file under a valid name
        check_finite(bad, dataset, accelerator, dtype)
        accelerator.wait_for_everyone()
        return LatentStore(paths=paths)

    # In memory: each process encodes every world-th image; the shards are gathered batch by batch
    # (all processes run the same number of batches, the last ones padded with repeats).
    n = len(dataset)
    per_process = math.ceil(n / world)
    mine = [min(rank + world * j, n - 1) for j in range(per_process)]
    store = None
    for batch_indices, moments in _encode(vae, dataset, mine, accelerator, dtype, batch_size, workers):
        index = torch.tensor(batch_indices, device=accelerator.device)
        if world > 1:
            index, moments = accelerator.gather(index), accelerator.gather(moments.contiguous())
        if store is None:
            store = torch.empty((n, *moments.shape[1:]), dtype=moments.dtype)
        store[index.cpu()] = moments.cpu()
    # Every process holds all moments now; the bad ones are counted once, on the main process.
    bad = (~torch.isfinite(store.flatten(1)).all(dim=1)).nonzero().flatten().tolist() if rank == 0 else []
    check_finite(bad, dataset, accelerator, dtype)
    return LatentStore(tensor=store)


def check_finite(bad: list[int], dataset, accelerator, dtype) -> None:
    """Stop, on every process, when the frozen VAE gave NaN/inf for some images (fp16 overflow, bad pixels)."""
    count = torch.tensor(float(len(bad)), device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    if count.item() == 0:
        return
    named = ", ".join(str(dataset.examples[i].image) for i in bad[:3])
    raise UserError(f"the VAE encoded {int(count.item())} image(s) to NaN/inf latents under {dtype} (e.g. {named or 'on another process'}): "
                    "use --mixed_precision bf16 or no (fp16 can overflow in the VAE), or check those images "
                    "(python -m sdtune.data check)")


class LatentStore:
    """Cached VAE moments by dataset index: one tensor in memory, or one file per image."""

    def __init__(self, tensor: torch.Tensor | None = None, paths: list[Path] | None = None):
        self.tensor, self.paths = tensor, paths

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensor[i] if self.tensor is not None else load_file(self.paths[i])["moments"]

    @staticmethod
    def estimated_bytes(n: int, resolution: int, dtype: torch.dtype) -> int:
        """Moments of n images: 8 channels (4 means, 4 log-variances) at 1/8 of the resolution."""
        return n * 8 * (resolution // 8) ** 2 * dtype.itemsize


class CachedLatentDataset(Dataset):
    """The training dataset with cached moments in place of decoded images: no image is read again."""

    def __init__(self, dataset, store: LatentStore):
        self.examples, self.store = dataset.examples, store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"latent_moments": self.store[i], "caption": self.examples[i].caption, "index": i}


class TextEmbeddingCache:
    """The frozen text encoder's output for each distinct caption, encoded once (on the CPU afterwards)."""

    def __init__(self, text_encoder, tokenizer, captions, device, autocast, batch_size: int = 64):
        self.rows: dict[str, int] = {}
        for caption in captions:
            self.rows.setdefault(caption, len(self.rows))
        distinct = list(self.rows)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(distinct), batch_size):
                # Tokenised exactly as the loop does, so an embedding equals the one the loop would compute.
                ids = tokenizer(distinct[start:start + batch_size], padding="max_length", truncation=True,
                                max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
                with autocast():
                    chunks.append(text_encoder(ids, return_dict=False)[0].cpu())
        self.embeddings = torch.cat(chunks)

    @staticmethod
    def estimated_bytes(captions, tokenizer, text_encoder) -> int:
        """Host memory the cache of these captions takes: one (77, hidden) fp32 array per distinct caption
        (the encoder's last LayerNorm runs in fp32 under autocast too)."""
        return len(set(captions)) * tokenizer.model_max_length * text_encoder.config.hidden_size * 4

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, captions: list[str], device) -> torch.Tensor:
        index = torch.tensor([self.rows[c] for c in captions])
        return self.embeddings[index].to(device, non_blocking=True)
