"""Shared fixtures. Tests never touch the network: the hub is switched off before any import."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars flood captured test output

import pytest  # noqa: E402  (after the environment is set, so nothing reads it earlier)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny SD1.5-family pipeline folder, built once per test session."""
    from sdtune.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def phantom_chexpert(tmp_path_factory):
    """OUT_DIR of a phantom CheXpert (sdtune.phantom) built once per test session: 100 images
    (90 train, 10 valid), 128 px, seed 0. CSV Paths are relative to it."""
    from sdtune.phantom import write_phantom_chexpert

    return write_phantom_chexpert(tmp_path_factory.mktemp("phantom"), n=100, size=128, seed=0)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tiny model's ops are too small to gain from threads; one thread is faster and steadier."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one process-wide state; each in-process training run gets a fresh one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
