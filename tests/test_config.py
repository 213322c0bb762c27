"""Settings dataclasses become strict command-line flags."""

import argparse
from dataclasses import dataclass

import pytest

from sdtune.config import add_arguments, field, from_args


@dataclass
class Demo:
    """Demo settings."""

    learning_rate: float = field(1e-4, "step size")
    lora_rank: int = field(4, "LoRA rank")
    mixed_precision: str = field("no", "precision", choices=("no", "fp16", "bf16"))
    use_ema: bool = field(False, "keep an EMA copy")
    lora_target_modules: list[str] = field(["to_q", "to_k"], "modules to adapt")
    revision: str | None = field(None, "hub revision")


def _parse(argv):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, Demo)
    return from_args(Demo, parser.parse_args(argv))


def test_defaults():
    assert _parse([]) == Demo()
    assert Demo().lora_target_modules is not Demo().lora_target_modules  # no shared mutable default


def test_underscores_and_hyphens_and_types():
    cfg = _parse(["--learning-rate", "5e-6", "--lora_rank=8", "--mixed-precision", "bf16",
                  "--lora_target_modules", "to_v", "to_out.0", "--revision", "main"])
    assert cfg == Demo(5e-6, 8, "bf16", False, ["to_v", "to_out.0"], "main")


@pytest.mark.parametrize("argv, expected", [(["--use_ema"], True), (["--use-ema", "false"], False), (["--use_ema", "1"], True)])
def test_booleans(argv, expected):
    assert _parse(argv).use_ema is expected


@pytest.mark.parametrize("argv", [["--lora_rank", "four"], ["--mixed_precision", "fp8"], ["--use_ema", "maybe"]])
def test_wrong_values_are_errors(argv):
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parse(argv)


def test_unknown_flags_are_errors():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Demo)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora_rnak", "8"])


def test_a_misspelt_flag_is_one_line_with_the_nearest_flag(capsys):
    from sdtune.config import ArgumentParser

    parser = ArgumentParser(prog="tool")
    add_arguments(parser, Demo)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--lora_rnak", "8", "--zzz"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: unrecognized arguments: --lora_rnak 8 (did you mean --lora_rank?), --zzz "
                                       "(tool --help lists every flag)\n")
    with pytest.raises(SystemExit):
        parser.parse_args(["--mixed_precision", "fp8"])
    err = capsys.readouterr().err
    assert err.startswith("error: argument --mixed_precision") and err.count("\n") == 1 and "usage" not in err


def test_a_list_flag_given_twice_keeps_the_last_and_says_so(capsys):
    # A wrapper passes its defaults first and the user's flags after: the user's must win.
    assert _parse(["--lora_target_modules", "to_v", "to_out.0"]).lora_target_modules == ["to_v", "to_out.0"]
    assert capsys.readouterr().err == ""
    cfg = _parse(["--lora_target_modules", "to_q", "--lora-target-modules", "to_v", "to_out.0"])
    assert cfg.lora_target_modules == ["to_v", "to_out.0"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lora-target-modules was given more than once" in err and "the last one is used" in err and "to_v to_out.0" in err
    assert Demo().lora_target_modules == ["to_q", "to_k"]  # the default was not changed in place


@pytest.mark.parametrize("argv", [["train_text_to_image.py"], ["synthesize_images.py"], ["evaluate.py"],
                                  ["evaluate.py", "compare"], ["downstream.py"], ["-m", "sdtune.data", "check"]])
def test_every_entry_point_prints_its_help(argv):
    # argparse formats help text with %: one "95% intervals" in a field's help once broke downstream.py --help
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, *argv, "--help"], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "Traceback" not in result.stderr
