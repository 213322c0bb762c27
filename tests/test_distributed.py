"""Two CPU processes (gloo) through `accelerate launch`: training (sharded once, resumable), evaluation and
sampling give what one process gives; FSDP is refused."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, processes, *args, mode=None, use_cpu_flag=True, check=True, timeout=600):
    # `--multi_gpu` picks torch's elastic launcher; ACCELERATE_USE_CPU=1 makes it gloo on CPUs
    # (`accelerate launch --cpu` alone starts a single process).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu_flag:
        env["ACCELERATE_USE_CPU"] = "1"
    mode = mode or (["--multi_gpu"] if processes > 1 else ["--cpu"])
    command = ["accelerate", "launch", *mode, "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               str(script), *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _args(tiny_model, phantom_chexpert, out, strategy, batch, steps, *extra):
    return ["--pretrained_model_name_or_path", tiny_model, "--train_csv",
            phantom_chexpert / "CheXpert-v1.0-small" / "train.csv", "--resolution", 64, "--strategy", strategy,
            "--train_batch_size", batch, "--max_train_steps", steps, "--learning_rate", "1e-3",
            "--output_dir", out, "--report_to", "none", *extra]


def test_ranks_see_disjoint_samples_that_cover_the_dataset(tiny_model, phantom_chexpert, tmp_path):
    _launch(ROOT / "tests" / "helpers" / "sample_order.py", 2,
            *_args(tiny_model, phantom_chexpert, tmp_path, "lora", 3, 1))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    from sdtune.data.dataset import DataConfig, load_examples

    n = len(load_examples(DataConfig(train_csv=str(phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"), resolution=64)))
    # accelerate pads the last uneven batch by repeating samples from the start; apart from that, disjoint
    padding = len(rank0) + len(rank1) - n
    assert 0 <= padding < 2 * 3
    assert set(rank0) | set(rank1) == set(range(n))
    assert len(set(rank0) & set(rank1)) <= padding
    assert len(set(rank0[: n // 2 - 3]) & set(rank1[: n // 2 - 3])) == 0


# torch.compile over the DDP wrapper: dynamo splits the graph at DDP's gradient buckets, and the
# gradients must still be averaged across processes (the eager backend keeps the arithmetic identical).
COMPILED = ["--torch_compile", "--torch_compile_backend", "eager"]


@pytest.mark.parametrize("strategy, disk_cache, extra", [("unet", False, []), ("lora", True, []),
                                                         ("difffit", False, COMPILED)])
def test_two_processes_match_one_process_with_twice_the_batch(strategy, disk_cache, extra, tiny_model, phantom_chexpert,
                                                              tmp_path):
    train = ROOT / "train_text_to_image.py"
    # Adam turns gradients near 0 into steps of +-lr whose sign is floating-point noise; a larger
    # epsilon keeps those steps small, so the comparison below can stay tight.
    stable = ["--adam_epsilon", "1e-4"]
    # The two processes cache latents in memory (gathered shards) or on disk (each writes its share).
    cache = ["--latent_cache_dir", tmp_path / "latents"] if disk_cache else []
    _launch(train, 2, *_args(tiny_model, phantom_chexpert, tmp_path / "two", strategy, 1, 3, *stable, *cache, *extra))
    _launch(train, 1, *_args(tiny_model, phantom_chexpert, tmp_path / "one", strategy, 2, 3, *stable))
    two = load_file(tmp_path / "two" / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    one = load_file(tmp_path / "one" / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(one[k], base[k]) for k in one)
    # the runs differ only in the order of floating-point sums
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)
    summary = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert summary["global_batch_size"] == 2
    # the logged loss is of both processes' samples, as one process's is of its whole batch
    one_summary = json.loads((tmp_path / "one" / "training_summary.json").read_text())
    assert summary["final_loss"] == pytest.approx(one_summary["final_loss"], rel=1e-4)
    assert summary["speed"]["torch_compile"] == ("eager" if extra else None)
    images = int(summary["encoded_once"]["latents"].split()[0])
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == (images if disk_cache else 0)


def test_two_processes_with_accumulation_match_one_process_with_the_whole_batch(tiny_model, phantom_chexpert, tmp_path):
    # Three prepared models, and a global batch of 4 = 1 x 2 processes x 2 accumulation steps. A
    # sample's noise depends on the optimizer step it serves, not on the micro-batch it came in.
    train, stable = ROOT / "train_text_to_image.py", ["--adam_epsilon", "1e-4"]
    _launch(train, 2, *_args(tiny_model, phantom_chexpert, tmp_path / "two", "unet+vae+text", 1, 2, *stable,
                             "--gradient_accumulation_steps", 2))
    _launch(train, 1, *_args(tiny_model, phantom_chexpert, tmp_path / "one", "unet+vae+text", 4, 2, *stable))
    for component, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("vae", "diffusion_pytorch_model")):
        two, one = (load_file(tmp_path / run / "final_model" / component / f"{name}.safetensors") for run in ("two", "one"))
        base = load_file(tiny_model / component / f"{name}.safetensors")
        assert any(not torch.equal(one[k], base[k]) for k in base), component
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "two" / "training_summary.json").read_text())["global_batch_size"] == 4


def test_a_checkpoint_from_two_processes_resumes_on_one_as_if_never_stopped(tiny_model, phantom_chexpert, tmp_path):
    # A linear decay over 4 steps: the schedule's position must be in optimizer steps, not process-steps
    # (2-process checkpoints resumed on one process once trained step 4 at a learning rate of 0).
    # (--adam_epsilon as above: Adam's division would blow float noise in near-zero gradients up)
    train = ROOT / "train_text_to_image.py"
    schedule = ["--lr_scheduler", "linear", "--checkpointing_steps", 2, "--adam_epsilon", "1e-4"]
    split, straight = tmp_path / "split", tmp_path / "straight"
    _launch(train, 2, *_args(tiny_model, phantom_chexpert, split, "bitfit", 1, 4, *schedule))
    assert (split / "checkpoint-2" / "unet_trained.safetensors").is_file()
    for done in ("checkpoint-4", "final_model", "training_summary.json"):  # as if stopped after step 2
        shutil.rmtree(split / done) if (split / done).is_dir() else (split / done).unlink()
    _launch(train, 1, *_args(tiny_model, phantom_chexpert, split, "bitfit", 2, 4, *schedule,
                             "--resume_from_checkpoint", "latest"))
    _launch(train, 1, *_args(tiny_model, phantom_chexpert, straight, "bitfit", 2, 4, *schedule))
    assert json.loads((split / "training_summary.json").read_text())["steps"] == 4
    resumed, expected = (load_file(run / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
                         for run in (split, straight))
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(expected[k], base[k]) for k in base)
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_processes_launched_on_a_machine_without_cuda_join_over_gloo(tiny_model, phantom_chexpert, tmp_path):
    # Without ACCELERATE_USE_CPU, accelerate alone would leave each process a run of its own, all
    # writing into one output_dir.
    result = _launch(ROOT / "train_text_to_image.py", 2, *_args(tiny_model, phantom_chexpert, tmp_path, "bitfit", 1, 1),
                     use_cpu_flag=False)
    assert "1 per device x 2 processes" in result.stdout
    assert json.loads((tmp_path / "training_summary.json").read_text())["global_batch_size"] == 2


def test_validation_fid_in_a_two_process_run_is_computed_by_the_main_process_alone(tiny_model, phantom_chexpert,
                                                                                  tmp_path, monkeypatch):
    # It used to share the feature extraction with processes that were not extracting: a hang.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the real set's feature cache
    valid = phantom_chexpert / "CheXpert-v1.0-small" / "valid.csv"
    _launch(ROOT / "train_text_to_image.py", 2,
            *_args(tiny_model, phantom_chexpert, tmp_path, "lora", 1, 2, "--validation_fid_steps", 1,
                   "--validation_real", valid, "--validation_prompts", "Chest x-ray", "--validation_fid_images", 4,
                   "--validation_inference_steps", 2), timeout=300)
    rows = [line.split(",") for line in (tmp_path / "validation" / "fid.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "2"] and all(float(r[1]) > 0 and r[3] == "4" for r in rows)


def test_fsdp_is_refused_in_one_line_before_the_output_folder_is_touched(tiny_model, phantom_chexpert, tmp_path):
    # The helper puts accelerate in its real FSDP mode on CPU processes (see its docstring).
    result = _launch(ROOT / "tests" / "helpers" / "fsdp_on_cpu.py", 2,
                     *_args(tiny_model, phantom_chexpert, tmp_path / "out", "unet", 1, 1),
                     mode=["--use_fsdp", "--fsdp_version", "2"], check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # One line: the second process waits before printing (sdtune.errors), and torchrun stops it once the first
    # has exited. A second line comes only if the first process is that much slower to fail (a loaded CI machine).
    assert 1 <= len(errors) <= 2, result.stderr[-3000:]
    assert all("FSDP mode is not supported" in e and "configs/accelerate/ddp.yaml" in e for e in errors)
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_strategy_script_launches_num_gpus_processes(tiny_model, phantom_chexpert, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "ACCELERATE_USE_CPU": "1", "NUM_GPUS": "2", "MODEL_NAME": str(tiny_model),
           "TRAIN_CSV": str(phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"), "OUTPUT_DIR": str(tmp_path),
           "MAX_TRAIN_STEPS": "1", "RESOLUTION": "64", "TRAIN_BATCH_SIZE": "1", "GRADIENT_ACCUMULATION_STEPS": "1",
           "MIXED_PRECISION": "no", "ACCELERATE_ARGS": f"--main_process_port {_free_port()} --dynamo_backend no"}
    result = subprocess.run(["bash", str(ROOT / "bitfit.sh"), "--report_to", "none"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 per device x 2 processes" in result.stdout
    assert json.loads((tmp_path / "training_summary.json").read_text())["global_batch_size"] == 2


def test_evaluation_features_shard_across_processes(phantom_chexpert, tmp_path):
    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    module = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(module))
    images = phantom_chexpert / "CheXpert-v1.0-small" / "valid"
    script = ROOT / "tests" / "helpers" / "features.py"
    _launch(script, 2, images, module, tmp_path / "two.pt")
    _launch(script, 1, images, module, tmp_path / "one.pt")
    two, one = torch.load(tmp_path / "two.pt", weights_only=True), torch.load(tmp_path / "one.pt", weights_only=True)
    assert one.shape[0] >= 5 and one.shape[1] == 12
    assert torch.equal(two, one)  # same rows, same order


class _FourFeatures(torch.nn.Module):
    # 4 features (one channel of the gray images, 2x2 means): fewer than the 10 real images, so
    # the covariances are not singular and FID is not at the mercy of rounding.
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x[:, :1], 2).flatten(1)


def _evaluate_args(phantom_chexpert, tmp_path, metrics: str) -> list:
    """evaluate.py on the phantom valid (real) and train (fake) folders with the 4-feature network."""
    torch.jit.script(_FourFeatures()).save(str(tmp_path / "net.pt"))
    images = phantom_chexpert / "CheXpert-v1.0-small"
    return ["--real", images / "valid", "--fake", images / "train", "--metrics", metrics,
            "--fid_features", tmp_path / "net.pt", "--fid_input_size", 32]


def test_evaluate_launched_as_two_processes_reports_once_what_one_process_reports(phantom_chexpert, tmp_path):
    args = [*_evaluate_args(phantom_chexpert, tmp_path, "fid,kid"), "--kid_subset_size", 2, "--cache", "false"]
    two = _launch(ROOT / "evaluate.py", 2, *args, "--output", tmp_path / "two.json", use_cpu_flag=False)
    one = _launch(ROOT / "evaluate.py", 1, *args, "--output", tmp_path / "one.json")
    for said in ("; resize: ", "FID ", "results:"):
        assert two.stdout.count(said) == one.stdout.count(said) == 1, two.stdout
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["features"]["cache"] == {"real": "off", "fake": "off"}  # both processes extracted
    assert two["metrics"]["fid"] == pytest.approx(one["metrics"]["fid"], rel=1e-9)
    assert two["metrics"]["kid"] == pytest.approx(one["metrics"]["kid"], rel=1e-9)
    assert two["samples"] == one["samples"] == {"real": 10, "fake": 90}


@pytest.mark.parametrize("metric", ["fid", "ms_ssim"])  # ms_ssim alone: decoded whole without a feature pass
def test_unreadable_images_of_every_process_are_reported_together(phantom_chexpert, tmp_path, metric):
    # Each process decodes every other image: both must stop with the same list, not one hang at the gather.
    args = _evaluate_args(phantom_chexpert, tmp_path, metric)
    fake = tmp_path / "fake"
    shutil.copytree(phantom_chexpert / "CheXpert-v1.0-small" / "valid", fake)
    first, second = sorted(p for p in fake.rglob("*.jpg"))[:2]  # items 0 and 1: one per process
    first.write_bytes(b"not an image")
    second.write_bytes(b"")
    args[args.index("--fake") + 1] = fake
    result = _launch(ROOT / "evaluate.py", 2, *args, "--cache", "false", use_cpu_flag=False, check=False, timeout=180)
    assert result.returncode != 0 and "2 problem(s) in fake " in result.stderr, result.stderr[-3000:]
    for image in (first, second):
        assert f"fake {image.relative_to(fake)}: " in result.stderr


def test_processes_whose_caches_differ_still_extract_together(phantom_chexpert, tmp_path):
    # One machine's cache holds the features, the other's does not: extraction is collective, so
    # both must extract (a process that read its cache alone would leave the other waiting forever).
    helper, caches = ROOT / "tests" / "helpers" / "cache_per_rank.py", tmp_path / "caches"
    args = [*_evaluate_args(phantom_chexpert, tmp_path, "fid"), "--fid_bootstrap", 0]
    _launch(helper, 1, caches, *args, "--output", tmp_path / "one.json")  # fills rank 0's cache only
    assert list((caches / "rank0").rglob("*.npy")) and not (caches / "rank1").exists()
    _launch(helper, 2, caches, *args, "--output", tmp_path / "two.json", use_cpu_flag=False, timeout=180)
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["features"]["cache"] == {"real": "computed", "fake": "computed"}
    assert two["metrics"]["fid"]["value"] == pytest.approx(one["metrics"]["fid"]["value"], rel=1e-9)


def test_clip_score_shared_by_two_processes_equals_one_process(phantom_chexpert, tmp_path):
    from helpers.clip import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip", seed=0)
    # A clinical table as the fake set: its captions come from the labels; 9 images do not split evenly.
    args = ["--fake", phantom_chexpert / "CheXpert-v1.0-small" / "valid.csv", "--metrics", "clip", "--clip_model", clip,
            "--batch_size", 2]
    _launch(ROOT / "evaluate.py", 2, *args, "--output", tmp_path / "two.json", use_cpu_flag=False)
    _launch(ROOT / "evaluate.py", 1, *args, "--output", tmp_path / "one.json")
    two, one = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"]["clip"] for n in ("two", "one"))
    assert two["n"] == one["n"] >= 5 and one["value"] > 0
    assert two["value"] == pytest.approx(one["value"], rel=1e-5)


def test_generate_samples_launched_as_two_processes_writes_one_grid_of_every_sample(tiny_model, tmp_path):
    out = tmp_path / "samples"
    result = _launch(ROOT / "evaluate.py", 2, "--generate-samples", "--num-samples", 5, "--prompt", "Chest x-ray",
                     "--model-path", tiny_model, "--output-dir", out, "--steps", 2, "--height", 32, "--width", 48)
    assert result.stdout.count("5 samples in") == 1  # the main process, after metadata.csv is complete
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "metadata.csv", "prompts.txt",
                                                     "synthesis_config.json"]
    assert len(list((out / "images").glob("*.png"))) == 5
    from PIL import Image

    assert Image.open(out / "grid.png").size == (3 * 48 + 2 * 2, 2 * 32 + 2)
