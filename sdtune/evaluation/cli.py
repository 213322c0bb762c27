"""evaluate.py's command line: the metrics mode, and the place where other modes plug in.

    evaluate.py --real REAL --fake FAKE --metrics fid,kid,clip,vendi,ms_ssim [--per-condition] --output results.json
    evaluate.py --generate-samples --num-samples 10 --prompt "..." [--model-path DIR]   (sdtune.evaluation.samples)
    evaluate.py compare RUN_DIR ... [--output-dir DIR]                                  (sdtune.evaluation.report)

A mode is a first word (`evaluate.py compare RUN_DIR ...`) or a flag (`--generate-samples`)
mapped to a function of the remaining arguments; anything else is the metrics mode.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from sdtune.config import ArgumentParser, add_arguments, from_args
from sdtune.errors import UserError
from sdtune.evaluation.core import EvalConfig, compute_metrics
from sdtune.processes import process_state


def _compare(argv: list[str]):
    from sdtune.evaluation.report import main as compare_main  # matplotlib only when asked for

    return compare_main(argv)


def _generate_samples(argv: list[str]):
    from sdtune.evaluation.samples import main as samples_main  # diffusers only when asked for

    return samples_main(argv)


def _check_features(argv: list[str]):
    """Load the feature network the flags name, say so, and stop. run_study.sh asks before any training, so
    that missing weights (xrv offline) fail in seconds, not after hours."""
    from sdtune.evaluation.core import feature_network

    argv = [a for a in argv if a.split("=")[0] not in ("--check_features", "--check-features")]
    cfg = from_args(EvalConfig, build_parser().parse_args(argv))
    network = feature_network(cfg)
    print(f"features ready: {network.name}, {network.dim}-d ({network.version})")
    return network


# First-word modes (subcommands) and flag modes; a new mode is one entry.
SUBCOMMANDS: dict[str, Callable[[list[str]], object]] = {"compare": _compare}
FLAG_MODES: dict[str, Callable[[list[str]], object]] = {"--generate_samples": _generate_samples,
                                                        "--check_features": _check_features}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    for flag, run in FLAG_MODES.items():
        if any(arg.split("=")[0] in (flag, flag.replace("_", "-")) for arg in argv):
            return run(argv)
    return evaluate_main(argv)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="evaluate.py", description="FID, KID, Vendi, MS-SSIM diversity and CLIP score of generated images.",
        epilog=f"modes: {', '.join(SUBCOMMANDS)} (evaluate.py MODE --help), {', '.join(FLAG_MODES)}")
    add_arguments(parser, EvalConfig)
    return parser


def evaluate_main(argv: list[str]) -> dict:
    cfg = from_args(EvalConfig, build_parser().parse_args(argv))
    if cfg.output and Path(cfg.output).expanduser().exists() and not cfg.overwrite:
        # checked first: an hour of features must not end in a refusal, nor replace earlier results unasked
        raise UserError(f"--output {cfg.output} already exists: pass --overwrite to replace it, or another --output")
    state = process_state()
    results = compute_metrics(cfg=cfg, log=state.print)
    if not state.is_main_process:
        return results  # every process of a launch holds the results; one reports them
    print(summary(results))
    if cfg.output:
        out = Path(cfg.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False, default=str) + "\n")
        print(f"results: {out}")
    return results


def _json_safe(value):
    """JSON has no NaN or infinity: an undefined number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _pm(value: float, spread: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def summary(results: dict) -> str:
    """The results in a few lines for a person; the JSON has everything."""
    m, lines = results["metrics"], []
    if "features" in results:
        f = results["features"]
        lines.append(f"features: {f['extractor']} ({f['dim']}-d), real {results['samples']['real']} / "
                     f"fake {results['samples']['fake']} images")
    if "fid" in m:
        fid = m["fid"]
        spread = f" (bootstrap std over {fid['bootstrap_resamples']})" if "std" in fid else ""
        lines.append(f"FID          {_pm(fid['value'], fid.get('std'))}{spread}")
        for condition, c in m.get("fid_per_condition", {}).items():
            value = "skipped" if c["value"] is None else _pm(c["value"], c.get("std"))
            lines.append(f"  {condition:<18} {value}  (real {c['n_real']}, fake {c['n_fake']})")
    if "kid" in m:
        k = m["kid"]
        lines.append(f"KID          {_pm(k['mean'], k['std'], 5)} ({k['subsets']} subsets of {k['subset_size']})")
    if "vendi" in m:
        v = m["vendi"]
        lines.append(f"Vendi        fake {v['fake']:.2f}" + (f", real {v['real']:.2f}" if "real" in v else ""))
    if "ms_ssim" in m:
        s = m["ms_ssim"]
        lines.append(f"MS-SSIM      {_pm(s['mean'], s['std'], 4)} ({s['pairs']} pairs, {s['scales']} scales; "
                     "lower = more diverse)")
    if "clip" in m:
        c = m["clip"]
        lines.append(f"CLIP score   {c['value']:.2f} ({c['model']}, {c['n']} images)")
    if results.get("warnings"):
        lines.append(f"{len(results['warnings'])} warning(s): see above (also in the results JSON)")
    return "\n".join(lines)
