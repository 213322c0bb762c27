"""Faults lose no work: kill -9, signals, crashes mid-save, NaN, occupied or unwritable output folders."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import sdtune.train
from sdtune.errors import UserError
from sdtune.train import main

ROOT = Path(__file__).resolve().parents[1]


def _argv(tiny_model, phantom_chexpert, out, *extra, steps=3):
    return ["--pretrained_model_name_or_path", str(tiny_model), "--train_csv",
            str(phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"), "--resolution", "64", "--strategy", "bitfit",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3",
            "--output_dir", str(out), "--report_to", "none", *map(str, extra)]


def _unet(folder):
    return load_file(folder / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")


def _start(argv):
    return subprocess.Popen([sys.executable, str(ROOT / "train_text_to_image.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            # one thread, like the in-process runs (conftest), so sums add up in the same order
                            env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})


def _wait_for(predicate, process, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, "training ended before the fault could be injected"
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_weights(tiny_model, phantom_chexpert, tmp_path):
    argv = _argv(tiny_model, phantom_chexpert, tmp_path / "killed", "--checkpointing_steps", 3, "--train_batch_size", 4,
                 steps=60)
    process = _start(argv)
    _wait_for(lambda: (tmp_path / "killed" / "checkpoint-3").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "final_model").exists()
    main(argv + ["--resume_from_checkpoint", "latest"])
    main(_argv(tiny_model, phantom_chexpert, tmp_path / "straight", "--checkpointing_steps", 3, "--train_batch_size", 4,
               steps=60))
    killed, straight = _unet(tmp_path / "killed"), _unet(tmp_path / "straight")
    for k in straight:
        torch.testing.assert_close(killed[k], straight[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model, phantom_chexpert, tmp_path):
    argv = _argv(tiny_model, phantom_chexpert, tmp_path, "--checkpointing_steps", 1000, "--train_batch_size", 4,
                 steps=500)
    process = _start(argv)
    # wait until the loop runs: the start-up summary is printed just before it
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("trainable:"):
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=120) == 0, output
    assert "stopped by SIGTERM after step" in output and "--resume_from_checkpoint latest" in output
    step = int(output.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert 0 < step < 500 and (tmp_path / f"checkpoint-{step}").is_dir()
    assert not (tmp_path / "final_model").exists()
    record = json.loads((tmp_path / "training_summary.json").read_text())
    assert record["status"] == "interrupted by SIGTERM" and record["steps"] == step and record["strategy"]["name"] == "bitfit"
    summary = main(argv[:-2] + ["--max_train_steps", str(step + 2), "--resume_from_checkpoint", "latest"])
    assert summary["steps"] == step + 2


def test_a_crash_during_a_checkpoint_keeps_the_previous_one(tiny_model, phantom_chexpert, tmp_path, monkeypatch):
    real_save = Accelerator.save_state
    calls = []

    def crashing_save(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "unet_trained.safetensors").write_bytes(b"half a file")
            raise OSError("disk died")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", crashing_save)
    with pytest.raises(OSError, match="disk died"):
        main(_argv(tiny_model, phantom_chexpert, tmp_path, "--checkpointing_steps", 1))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]  # the half-written one is hidden
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    summary = main(_argv(tiny_model, phantom_chexpert, tmp_path, "--checkpointing_steps", 1,
                         "--resume_from_checkpoint", "latest"))
    assert summary["steps"] == 3 and (tmp_path / "final_model" / "model_index.json").is_file()
    assert not list(tmp_path.glob(".checkpoint-*"))  # the leftover was replaced by the complete save


def _nan_on(calls_to_poison):
    real = sdtune.train.diffusion_loss
    count = {"n": 0}

    def poisoned(*args, **kwargs):
        count["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if count["n"] in calls_to_poison else loss

    return poisoned


def test_nan_steps_are_skipped_and_counted(tiny_model, phantom_chexpert, tmp_path, monkeypatch):
    monkeypatch.setattr(sdtune.train, "diffusion_loss", _nan_on({2, 3}))
    summary = main(_argv(tiny_model, phantom_chexpert, tmp_path, steps=4))
    assert summary["skipped_nonfinite_steps"] == 2 and summary["steps"] == 4
    assert all(torch.isfinite(t).all() for t in _unet(tmp_path).values())


def test_a_resumed_run_counts_the_steps_skipped_before_its_checkpoint(tiny_model, phantom_chexpert, tmp_path, monkeypatch):
    monkeypatch.setattr(sdtune.train, "diffusion_loss", _nan_on({2}))
    first = main(_argv(tiny_model, phantom_chexpert, tmp_path, "--checkpointing_steps", 2, steps=2))
    counters_file = tmp_path / "checkpoint-2" / "counters.json"
    counters = json.loads(counters_file.read_text())
    assert {k: counters[k] for k in ("skipped_steps", "nonfinite_in_a_row", "resumes")} == {
        "skipped_steps": 1, "nonfinite_in_a_row": 1, "resumes": 0}
    assert 0 < counters["train_seconds"] <= first["wall_time_seconds"]  # saved at the checkpoint, before the end
    # The first segment's training time joins the resumed one's: GPU-hours (evaluate.py compare) are the run's.
    counters_file.write_text(json.dumps({**counters, "train_seconds": 1000.0}))  # as if it had taken long
    monkeypatch.setattr(sdtune.train, "diffusion_loss", _nan_on(set()))
    start = time.time()
    summary = main(_argv(tiny_model, phantom_chexpert, tmp_path, "--checkpointing_steps", 2,
                         "--resume_from_checkpoint", "latest", steps=4))
    assert summary["steps"] == 4 and summary["skipped_nonfinite_steps"] == 1 and summary["resumes"] == 1
    assert 1000 < summary["wall_time_seconds"] < 1000 + (time.time() - start)


def test_too_many_nan_steps_stop_with_advice_and_save_nothing(tiny_model, phantom_chexpert, tmp_path, monkeypatch):
    monkeypatch.setattr(sdtune.train, "diffusion_loss", _nan_on(set(range(1, 100))))
    with pytest.raises(UserError, match=r"3 steps in a row with NaN/inf gradients.*learning rate.*bf16"):
        main(_argv(tiny_model, phantom_chexpert, tmp_path, "--max_nonfinite_steps", 3, steps=10))
    assert not (tmp_path / "final_model").exists()


def test_an_occupied_output_dir_is_not_overwritten_by_accident(tiny_model, phantom_chexpert, tmp_path):
    main(_argv(tiny_model, phantom_chexpert, tmp_path, steps=1))
    before = (tmp_path / "training_summary.json").read_text()
    with pytest.raises(UserError, match="already holds a run.*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        main(_argv(tiny_model, phantom_chexpert, tmp_path, steps=1))
    assert (tmp_path / "training_summary.json").read_text() == before
    main(_argv(tiny_model, phantom_chexpert, tmp_path, "--overwrite_output_dir", "--seed", 7, steps=1))
    assert json.loads((tmp_path / "training_summary.json").read_text())["arguments"]["train"]["seed"] == 7


def test_overwriting_a_run_removes_all_it_wrote_but_nothing_outside_it(tiny_model, phantom_chexpert, tmp_path):
    run, outside_logs = tmp_path / "run", tmp_path / "shared_logs"
    main(_argv(tiny_model, phantom_chexpert, run, steps=1))  # BitFit: bitfit_weights.safetensors beside final_model
    assert (run / "bitfit_weights.safetensors").is_file()
    # what other runs leave: validation FID rows, tensorboard events, a data problem list; and a latent cache
    for path in ("validation/fid.csv", "logs/events.out", "data_problems.txt", "latent_cache/abc.safetensors",
                 "notes.txt", "results.json", "evaluation/inception.json", "samples/edema/images/000000.png"):
        (run / path).parent.mkdir(parents=True, exist_ok=True)
        (run / path).write_text("old")
    main(_argv(tiny_model, phantom_chexpert, run, "--overwrite_output_dir", "--strategy", "lora", steps=1))
    left = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and "final_model" not in p.parts}
    assert "bitfit_weights.safetensors" not in left and "pytorch_lora_weights.safetensors" in left
    assert not {"validation/fid.csv", "logs/events.out", "data_problems.txt", "results.json", "evaluation/inception.json",
                "samples/edema/images/000000.png"} & left  # never mixed into, or compared as, the new run's
    assert {"latent_cache/abc.safetensors", "notes.txt"} <= left  # keyed by what made them; not the run's
    # a --logging_dir outside the run (or the run folder itself) is never removed
    (outside_logs / "other_run").mkdir(parents=True)
    for logging_dir in (str(outside_logs), "."):
        main(_argv(tiny_model, phantom_chexpert, run, "--overwrite_output_dir", "--logging_dir", logging_dir, steps=1))
        assert (outside_logs / "other_run").is_dir() and (run / "notes.txt").is_file()


def test_unwritable_output_dir_is_reported_before_training(tiny_model, phantom_chexpert, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to --output_dir"):
        main(_argv(tiny_model, phantom_chexpert, tmp_path / "a_file" / "run"))


def test_a_full_disk_is_reported_before_training(tiny_model, phantom_chexpert, tmp_path, monkeypatch):
    monkeypatch.setattr(sdtune.train.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="GiB free, but a checkpoint and the final model need"):
        main(_argv(tiny_model, phantom_chexpert, tmp_path))
    assert not list(tmp_path.glob("checkpoint-*"))


def test_out_of_memory_lists_the_memory_options(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sdtune.train, "train", oom)
    with pytest.raises(UserError, match="--train_batch_size.*--gradient_checkpointing.*--use_8bit_adam"):
        main(["--strategy", "lora"])


def test_a_missing_package_is_one_line_naming_the_requirements(capsys):
    import importlib

    from sdtune.errors import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: importlib.import_module("no_such_package.sub"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "'no_such_package' is missing" in err and "requirements.txt" in err
    with pytest.raises(ModuleNotFoundError):  # a module of our own that is missing is a bug: the traceback stays
        run_cli(lambda: importlib.import_module("sdtune.no_such_module"))


@pytest.mark.parametrize(("local_rank", "waits"), [(None, False), ("0", False), ("1", True)])
def test_under_several_processes_only_a_machines_first_prints_at_once(monkeypatch, capsys, local_rank, waits):
    """The other processes wait before printing: the launcher stops them once the first one has exited."""
    import sdtune.errors
    from sdtune.errors import run_cli

    events = []
    monkeypatch.setattr(sdtune.errors.time, "sleep", lambda s: events.append(("sleep", s, capsys.readouterr().err)))
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)

    def fail():
        raise UserError("the flag is wrong")

    with pytest.raises(SystemExit):
        run_cli(fail)
    assert capsys.readouterr().err == "error: the flag is wrong\n"
    # the wait comes before the line, not after it
    assert events == ([("sleep", sdtune.errors.OTHER_PROCESSES_WAIT_S, "")] if waits else [])


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("xformers") is not None, reason="xformers installed")
def test_xformers_asked_for_but_missing_is_one_clear_error(tiny_model, phantom_chexpert, tmp_path):
    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    with pytest.raises(UserError, match="needs the xformers package.*SDPA"):
        main(["--pretrained_model_name_or_path", str(tiny_model), "--train_csv", str(table), "--output_dir",
              str(tmp_path / "run"), "--strategy", "lora", "--enable_xformers_memory_efficient_attention"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["--offload_param_device=cpu"], ["--offload-optimizer-device", "cpu"]])
def test_deepspeeds_offload_flags_point_to_the_low_memory_profile(argv):
    # The tutorial's advice for out-of-memory errors
    with pytest.raises(UserError, match="is not a flag of this toolkit.*--memory_profile low"):
        sdtune.train.parse_args(argv)
    # A value that reads like one is no flag
    assert sdtune.train.parse_args(["--validation_prompts", "--offload_param_device=cpu"[2:]])[0].validation_prompts


def test_the_tutorials_retired_model_id_is_mapped_to_where_sd15_moved(capsys):
    from sdtune import SD15_MODEL_ID
    from sdtune.models import current_model_id

    assert current_model_id("runwayml/stable-diffusion-v1-5") == SD15_MODEL_ID
    assert "was removed from the Hugging Face hub" in capsys.readouterr().out
    assert current_model_id("someone/other-model") == "someone/other-model"
