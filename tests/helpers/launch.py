"""Run a wrapper script with a stand-in `accelerate` that records its command line."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def recorded_launch(tmp_path: Path, script: str, cwd: Path, *args: str, **env: str) -> list[str]:
    """The argv `accelerate` got from ROOT/script run with `args` and `env` added to the environment."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    stub = tmp_path / "bin" / "accelerate"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ACCELERATE_ARGV"\n')
    stub.chmod(0o755)
    env = {**os.environ, **env, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
           "ACCELERATE_ARGV": str(tmp_path / "argv")}
    result = subprocess.run(["bash", str(ROOT / script), *args], env=env, capture_output=True, text=True, cwd=cwd,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return (tmp_path / "argv").read_text().split("\0")[:-1]
