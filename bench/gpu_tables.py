"""BENCHMARKS.md's tables from a gpu_session.sh result folder, as Markdown.

    python bench/gpu_tables.py RESULTS_DIR > tables.md

Reads whichever of the session's JSON files are there (train_speed*.json, synth_speed*.json,
train_memory.json, paged_resume.json, dora_overhead.json, profile_step*.json) and prints one table per benchmark,
headed by the device, versions and date the runs recorded. A run cut short (status "running")
is marked as such; a row that failed shows its error. Nothing is computed that the JSON does
not hold, except the gap to a target (reached / target) and, for records older than the field,
the ratio's standard error from the step times they hold. A field a record predates shows "-".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NO_VERDICT, fmt, ratio_se  # noqa: E402

NAMES = {"unet": "full U-Net", "lora": "LoRA", "dora": "DoRA", "bitfit": "BitFit", "difffit": "DiffFit",
         "unet+vae+text": "U-Net+VAE+text"}
TRAIN_FILES = ("train_speed.json", "train_speed_more.json", "train_speed_compiled.json", "train_speed_compiled_peft.json",
               "train_speed_attention.json", "train_speed_compiled_cudnn.json", "train_speed_fp16.json",
               "train_speed_batch1.json")


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def cut_short(record: dict) -> str:
    return " **(cut short: the rows it finished)**" if record.get("status") == "running" else ""


def origin(record: dict) -> str:
    versions = record.get("versions", {})
    names = ", ".join(f"{k} {versions[k]}" for k in ("torch", "cuda", "diffusers", "transformers", "accelerate", "peft")
                      if versions.get(k))
    return f"{record.get('device', record.get('device_name', '?'))}; {names}; {record.get('date', 'date not recorded')}"


def reference_loading(settings: dict) -> str:
    """How the reference's images were loaded (records before session 12: on its main thread)."""
    workers = settings.get("reference_workers")
    return (f"the reference's images decoded by {workers} loader workers" if workers
            else "the reference's images decoded on its main thread (the script's default)")


def row_se(r: dict, timed_steps: int | None) -> float | None:
    """The ratio's standard error as the row recorded it, or (older records) from both sides' timed step times."""
    if "ratio_se" in r or not timed_steps:
        return r.get("ratio_se")
    steps = lambda side: (side.get("step_seconds") or [])[-timed_steps:]  # noqa: E731
    return ratio_se(r.get("ratio"), steps(r["toolkit"]), steps(r["reference"]))


def target_cell(r: dict, se: float | None = None) -> str:
    """The target verdict, with what decided it: the speed reached, the peak memory (allocated and reserved)
    against the reference's, and whether the ratio is within 2 standard errors of the target.
    None against a reference measured in another process: the issue wants both in one."""
    if "target_ratio" not in r:
        return "-"
    ref, tk, reached = r["reference"], r["toolkit"], r["ratio"]
    if ref.get("reused_from") or r.get("meets_target") is None:
        return r.get("no_verdict", NO_VERDICT)
    parts = [] if reached is None else [f"speed {reached / r['target_ratio']:.0%} of it"]
    memory_above = False
    for kind, key in (("allocated", "peak_gib"), ("reserved", "peak_reserved_gib")):
        if tk.get(key) is None or ref.get(key) is None:
            parts.append(f"{kind} peak not recorded")
            continue
        memory_above |= tk[key] > ref[key]
        parts.append(f"{kind} peak " + ("within" if tk[key] <= ref[key] else "above") + " the reference's")
    if se is not None and reached is not None and abs(reached - r["target_ratio"]) < 2 * se:
        parts.append(f"within noise: {abs(reached - r['target_ratio']):.2f} from the target, se {se:.2f}")
    met = r["meets_target"] and not memory_above  # older rows were judged on the allocated peak alone
    return f"{r['target_ratio']:.1f}x: {'met' if met else 'missed'}" + (f" ({'; '.join(parts)})" if parts else "")


def published_cell(record: dict, r: dict, warnings: list[str]) -> str:
    """REFERENCE.md section 9's H100 figure for the row's recipe at batch 16, and how far the measured
    reference is from it: a slow reimplementation would flatter every ratio."""
    ref = r["reference"]
    published = record.get("published_reference_h100_batch16", {}).get(ref.get("recipe"))
    if r["batch_size"] != 16 or not published or ref.get("samples_per_second") is None:
        return "-"
    off = ref["samples_per_second"] / published["samples_per_second"] - 1
    if abs(off) > 0.10:
        warnings.append(f"the measured {ref['recipe']} reference ({ref['samples_per_second']:.1f} samples/s) is "
                        f"{off:+.0%} off REFERENCE.md's {published['samples_per_second']:.1f} (H100): compare the "
                        "device and versions before trusting its ratios")
    return f"{published['samples_per_second']:.1f} ({off:+.0%})"


def train_speed_table(folder: Path) -> str | None:
    rows, heads, warnings = [], [], []
    for name in TRAIN_FILES:
        record = load(folder, name)
        if record is None:
            continue
        settings = record["settings"]
        heads.append(f"`{name}`: {settings['resolution']} px, {settings['warmup_steps']} warm-up + "
                     f"{settings['timed_steps']} timed steps, reference {settings['reference_precision']}, "
                     f"{reference_loading(settings)}; "
                     f"{origin(record)}{cut_short(record)}")
        rank = record["settings"].get("lora_rank")
        for r in record["results"]:
            ref, tk = r["reference"], r["toolkit"]
            flags = r.get("toolkit_args", settings.get("toolkit_args") or "")  # a row's own (several sets a run), or its run's
            strategy = NAMES.get(r["strategy"], r["strategy"]) + (f" r{rank}" if r["strategy"] in ("lora", "dora") else "")
            if ref.get("recipe") != r["strategy"]:
                strategy += f" (vs {NAMES.get(ref['recipe'], ref['recipe'])} reference)"
            toolkit = r["toolkit_mixed_precision"] + (f" `{flags}`" if flags else "")
            once = (tk.get("encoded_once") or {}).get("seconds")
            measured_in = (f"`{Path(ref['reused_from']).name}` (another process)" if ref.get("reused_from")
                           else "this run")
            se = row_se(r, settings.get("timed_steps"))
            rows.append([strategy, r["batch_size"], toolkit, fmt(ref.get("samples_per_second")),
                         fmt(tk.get("samples_per_second")), fmt(r.get("ratio"), ".2f"), fmt(se, ".3f"),
                         target_cell(r, se), fmt(ref.get("peak_gib"), ".2f"), fmt(tk.get("peak_gib"), ".2f"),
                         fmt(ref.get("peak_reserved_gib"), ".2f"), fmt(tk.get("peak_reserved_gib"), ".2f"),
                         fmt(ref.get("data_wait_seconds_per_step"), ".3f", "not recorded"),
                         fmt(ref.get("first_step_seconds"), ".1f", "not recorded"),
                         fmt(tk.get("first_step_seconds"), ".1f", "not recorded"), fmt(once),
                         published_cell(record, r, warnings), measured_in,
                         ref.get("error") or tk.get("error") or ""])
    if not rows:
        return None
    header = ["strategy", "batch", "toolkit", "reference samples/s", "toolkit samples/s", "toolkit/ref",
              "toolkit/ref se", "target", "ref peak GiB allocated", "toolkit peak GiB allocated",
              "ref peak GiB reserved", "toolkit peak GiB reserved", "ref data wait s/step", "ref first step s",
              "toolkit first step s", "encoded once, s", "REFERENCE.md H100 (measured ref off by)",
              "reference measured in", "error"]
    notes = "".join(f"\n\n**Warning:** {w}" for w in dict.fromkeys(warnings))
    return "### Training speed\n\n" + "\n".join(f"- {h}" for h in heads) + "\n\n" + markdown(header, rows) + notes


def warmup_seconds(side: dict) -> str:
    """The warm-up batches' seconds (torch.compile compiles and cuDNN autotunes there); older JSON has none."""
    return fmt(sum(side["warmup_seconds"]) if "warmup_seconds" in side else None, ".1f")


def synth_speed_table(folder: Path) -> str | None:
    rows, heads = [], []
    for name in ("synth_speed.json", "synth_speed_compiled.json", "synth_speed_compiled_cudnn.json",
                 "synth_speed_ablation.json"):
        record = load(folder, name)
        if record is None or record.get("reference") is None:
            continue
        isolation = {True: "each side in its own process", False: "all sides in one process (cuDNN's algorithm "
                     "cache shared)"}.get(record["settings"].get("isolate"), "all sides in one process (before --isolate)")
        heads.append(f"`{name}`: {origin(record)}{cut_short(record)}; {isolation}")
        ref = record["reference"]
        rows.append([f"StableDiffusionPipeline ({name})", fmt(ref["images_per_second"], ".2f"), "1.00",
                     fmt(ref.get("peak_gib"), ".2f"), warmup_seconds(ref), "-", "-"])
        for row in record["toolkit"]:
            difference = row["image_difference"]
            same = f"{'yes' if row['same_images'] else 'NO'} (mean abs. diff. {difference['mean_abs']:.1e}"
            same += f", max {difference['max_abs']:.1e})" if "same_sampling" in row else ")"
            if "same_work" in row:
                same += f"; U-Net calls {'as the reference' if row['same_work'] else '**NOT as the reference**'}"
            if "same_sampling" in row:
                sampling = "as the reference" if row["same_sampling"] else "**NOT as the reference**"
                same += f"; timesteps and guidance {sampling}"
            target = "-"
            if row.get("refused"):  # other images, work, timesteps or guidance: never counted
                target = "refused"
            elif "meets_target" in row:
                target = f"{record['target_ratio']:.1f}x: {'met' if row['meets_target'] else 'missed'}"
            rows.append([f"sdtune {row['name']} {row['flags']}".strip(), fmt(row["images_per_second"], ".2f"),
                         fmt(row["ratio"], ".2f"), fmt(row.get("peak_gib"), ".2f"), warmup_seconds(row), same, target])
        if record.get("fast_recipe"):
            fast = record["fast_recipe"]
            rows.append([f"fast recipe {fast['flags']}", fmt(fast["images_per_second"], ".2f"), fmt(fast["ratio"], ".2f"),
                         fmt(fast.get("peak_gib"), ".2f"), warmup_seconds(fast), "other images (not compared)",
                         "not counted"])
    if not rows:
        return None
    header = ["synthesis", "images/s", "ratio to its reference", "peak GiB", "warm-up s", "same images", "target"]
    return "### Synthesis speed\n\n" + "\n".join(f"- {h}" for h in heads) + "\n\n" + markdown(header, rows)


def train_memory_table(folder: Path) -> str | None:
    record = load(folder, "train_memory.json")
    if record is None:
        return None
    published = record.get("published_reference_batch1_gib", {})
    budget = record["settings"]["budget_gib"]
    rows = [[r["strategy"], r["profile"], fmt(r["peak_gib"], ".2f"),
             fmt(r["peak_reserved_gib"], ".2f"), fmt(r.get("ballast_gib"), ".1f"),
             {True: "yes", False: "**no**", None: "-"}[r["fits_budget"]],
             fmt((published.get(r["strategy"]) or [None])[0], ".1f"), r.get("error") or ""] for r in record["results"]]
    header = ["strategy", "profile", "peak allocated GiB", "peak reserved GiB", "ballast GiB", f"fits {budget} GiB",
              "reference GiB (plain)", "error"]
    return (f"### Memory at batch 1, {record['settings']['resolution']} px\n\n- {origin(record)}{cut_short(record)}\n\n"
            + markdown(header, rows))


def paged_resume_line(folder: Path) -> str | None:
    record = load(folder, "paged_resume.json")
    if record is None:
        return None
    at = record["at_resume"]
    return (f"### Paged resume\n\n- {origin(record)}\n\n{at.get('optimizer')}: {at.get('moved')} of {at.get('moments')} "
            f"moments copied back into pages; large moments in pages {at.get('large_moments_in_pages')}/"
            f"{at.get('large_moments')}; allocated {fmt(at.get('allocated_gib_before_paging'), '.2f')} -> "
            f"{fmt(at.get('allocated_gib_after_paging'), '.2f')} GiB; peak straight "
            f"{fmt(record['straight']['peak_gib'], '.2f')} GiB, resumed {fmt(record['resumed']['peak_gib'], '.2f')} GiB; "
            f"paged again: {'yes' if record.get('paged_again') else 'no'}")


def dora_overhead_table(folder: Path) -> str | None:
    record = load(folder, "dora_overhead.json")
    if record is None:
        return None
    by_shape: dict[str, dict] = {}
    for row in record["rows"]:
        by_shape.setdefault(row["shape"], {})[row["variant"]] = row
    rows = [[shape, fmt(v["lora"]["ms"], ".2f"), fmt(v["dora"]["ratio_to_lora"], ".2f"),
             fmt(v["dora+fused"]["ratio_to_lora"], ".2f"), fmt(v["dora+fused"].get("max_rel_err"), ".0e")]
            for shape, v in by_shape.items() if {"lora", "dora", "dora+fused"} <= set(v)]
    head = (f"{record['device_name']}, {record['dtype']}, batch {record['batch']}, rank {record['rank']}; "
            + ", ".join(f"{k} {v}" for k, v in record["versions"].items()))
    return ("### DoRA's overhead\n\n- " + head + "\n\n"
            + markdown(["shape", "LoRA ms", "peft DoRA / LoRA", "toolkit DoRA / LoRA", "max rel. difference"], rows))


PROFILE_FILES = ("profile_step.json", "profile_step_main_thread.json", "profile_step_compiled.json")


def kernel_name(name: str, width: int = 100) -> str:
    """A demangled kernel name, short enough for a table: namespaces and parameter lists dropped, the
    template arguments (which tell elementwise kernels apart) kept, in code quotes so that Markdown
    leaves its * and | alone."""
    short = re.sub(r"\(anonymous namespace\)::|\b(void |at::native::|at::|c10::|std::)", "", name)
    previous = None
    while previous != short:  # parameter lists, innermost first
        previous, short = short, re.sub(r"\([^()]*\)", "", short)
    short = short if len(short) <= width else short[:width - 3] + "..."
    return "`" + short.replace("`", "'").replace("|", "\\|") + "`"


def profile_table(folder: Path) -> str | None:
    """profile_step.py's per-step breakdown: one column a side, a row a kind of kernel, then each side's
    costliest kernels (seconds a step, under the profiler: where the time goes, not how fast it is)."""
    parts = []
    for name in PROFILE_FILES:
        record = load(folder, name)
        if record is None or not record.get("sides"):
            continue
        settings, sides = record["settings"], record["sides"]
        flags = f" `{settings['toolkit_args']}`" if settings.get("toolkit_args") else ""
        kinds = list(dict.fromkeys(k for side in sides.values() for k in side["kinds"]))
        header = ["s a step", *(f"{side}{flags if side == 'toolkit' else ''}" for side in sides)]
        rows = [["wall (profiled)", *(fmt(s["wall_seconds_per_step"], ".4f") for s in sides.values())],
                ["device busy", *(f"{fmt(s['device_seconds_per_step'], '.4f')} ({fmt(s['busy_fraction'], '.0%')})"
                                  for s in sides.values())]]
        rows += [[kind, *(fmt(s["kinds"].get(kind), ".4f") for s in sides.values())] for kind in kinds]
        top = [[side, kernel_name(t["name"]), t["kind"], f"{t['seconds_per_step']:.4f}"]
               for side, s in sides.items() for t in s["top"][:5]]
        parts.append(f"- `{name}`: {settings['strategy']}, batch {settings['batch_size']}, {settings['resolution']} px, "
                     f"{settings['profiled_steps']} profiled steps, {reference_loading(settings)}; "
                     f"{origin(record)}{cut_short(record)}\n\n"
                     + markdown(header, rows) + "\n\n" + markdown(["side", "costliest kernels", "kind", "s a step"], top))
    return "### Where a step's time goes (torch.profiler)\n\n" + "\n\n".join(parts) if parts else None


def tables(folder: Path) -> str:
    parts = [f(folder) for f in (train_speed_table, synth_speed_table, train_memory_table, paged_resume_line,
                                 dora_overhead_table, profile_table)]
    parts = [p for p in parts if p]
    session = folder / "session.txt"
    if session.is_file():
        parts.append("### The session\n\n```\n" + session.read_text().strip() + "\n```")
    return "\n\n".join(parts) if parts else f"no gpu_session.sh results in {folder}"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="where gpu_session.sh wrote its JSON ($OUT)")
    text = tables(p.parse_args(argv).folder)
    print(text)
    return text


if __name__ == "__main__":
    main()
