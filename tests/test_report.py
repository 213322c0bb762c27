"""evaluate.py compare (the study's table and plots) and evaluate.py --generate-samples."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import UserError
from sdtune.evaluation.cli import main
from sdtune.evaluation.report import MISSING, column_titles, plot_fid_against, processes, spread
from sdtune.evaluation.samples import default_model_path, image_grid

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- fake runs


def summary(strategy: str, total: int, percent: float, *, peak=None, sps=12.5, wall=7200.0, global_batch=64,
            batch=4, accumulation=4, status="complete") -> dict:
    return {"status": status, "strategy": {"name": strategy}, "steps": 1000,
            "trainable_parameters": {"unet": total, "text_encoder": 0, "vae": 0, "total": total},
            "trainable_percent_of_sd15": percent, "samples_per_second": sps, "peak_gpu_memory_gib": peak,
            "wall_time_seconds": wall, "global_batch_size": global_batch,
            "arguments": {"train": {"train_batch_size": batch, "gradient_accumulation_steps": accumulation}}}


def results(extractor: str, fid: float, fid_std=None, kid=(0.01, 0.002), vendi=(3.5, 4.0), clip=None,
            fake_source=None, per_condition=None, n=(100, 200)) -> dict:
    metrics = {"fid": {"value": fid, **({"std": fid_std, "bootstrap_resamples": 10} if fid_std is not None else {})},
               "kid": {"mean": kid[0], "std": kid[1], "subsets": 100, "subset_size": 100},
               "vendi": {"fake": vendi[0], "real": vendi[1], "n_fake": n[1], "n_real": n[0]}}
    if clip is not None:
        metrics["clip"] = {"value": clip, "model": "some/clip", "n": n[1]}
    if per_condition:
        metrics["fid_per_condition"] = per_condition
    out = {"metrics": metrics, "samples": {"real": n[0], "fake": n[1]},
           "features": {"extractor": extractor, "dim": 2048, "resize": "r", "version": "v"}}
    if fake_source:
        out["fake"] = {"source": str(fake_source), "kind": "synthesis", "n": n[1]}
    return out


def write_run(folder: Path, summary_data: dict | None, files: dict[str, dict]) -> Path:
    folder.mkdir(parents=True)
    if summary_data is not None:
        (folder / "training_summary.json").write_text(json.dumps(summary_data))
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(data))
    return folder


def write_images(folder: Path, n: int, size: int, value: int) -> Path:
    (folder / "images").mkdir(parents=True)
    rows = ["file_name,prompt,negative_prompt,seed,steps,guidance,scheduler,Cardiomegaly,text"]
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), (value + 20 * i) % 256, np.uint8)).save(folder / "images" / f"{i:06d}.png")
        rows.append(f"images/{i:06d}.png,p,,{i},50,7.5,pndm,1,p")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def two_runs(tmp_path):
    """unet: Inception and XRV results, CLIP, per-condition FID, a synthetic folder; lora: Inception only."""
    unet_fake = write_images(tmp_path / "synthetic" / "unet", 5, 32, 10)
    lora_fake = write_images(tmp_path / "synthetic" / "lora", 5, 48, 100)
    per_cond = {"Cardiomegaly": {"value": 50.5, "std": 2.5, "n_real": 10, "n_fake": 20},
                "Edema": {"value": None, "n_real": 1, "n_fake": 0}}
    unet = write_run(tmp_path / "runs" / "unet", summary("unet", 859_520_964, 79.89, peak=11.75, wall=7200.0), {
        "results.json": results("inception", 25.125, 1.5, clip=31.25, fake_source=unet_fake / "metadata.csv",
                                per_condition=per_cond),
        "evaluation/xrv.json": results("xrv", 3.25, 0.125, kid=(0.002, 0.0005), vendi=(2.5, 2.75)),
    })
    lora = write_run(tmp_path / "runs" / "lora", summary("lora", 1_594_368, 0.1482, peak=None, sps=30.0, wall=1800.0,
                                                         global_batch=8, batch=8, accumulation=1), {
        "evaluation/inception.json": results("inception", 40.0, None, kid=(0.03, 0.001), vendi=(3.0, 4.0),
                                             fake_source=lora_fake),
    })
    return unet, lora


def run_compare(runs, out, *extra):
    return main(["compare", *map(str, runs), "--output-dir", str(out), *extra])


def read_markdown_table(text: str) -> list[dict]:
    lines = [line for line in text.split("\n\n")[0].splitlines() if line.startswith("|")]
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(headers, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:]]


# ------------------------------------------------------------------------------- compare


def test_table_values_equal_the_inputs(two_runs, tmp_path, capsys):
    report = run_compare(two_runs, tmp_path / "cmp")
    printed = capsys.readouterr().out
    table = read_markdown_table((tmp_path / "cmp" / "comparison.md").read_text())
    assert table == read_markdown_table(printed)  # the printed table is the written one
    unet, lora = table
    assert unet == {
        "run": "unet", "strategy": "unet", "steps": "1000", "trainable params": "859,520,964", "% of SD1.5": "79.9%",
        "peak mem (GiB)": "11.75", "samples/s": "12.5", "GPU-hours": "8",  # 7200 s x 4 processes (64 / (4 x 4))
        "FID (Inception)": "25.12 ± 1.50", "KID (Inception)": "0.0100 ± 0.0020", "Vendi (Inception)": "3.50",
        "FID (XRV)": "3.25 ± 0.12", "KID (XRV)": "0.0020 ± 0.0005", "Vendi (XRV)": "2.50",
        "CLIP score": "31.25", "MS-SSIM": MISSING}
    assert lora["trainable params"] == "1,594,368" and lora["% of SD1.5"] == "0.148%"
    assert lora["GPU-hours"] == "0.5" and lora["peak mem (GiB)"] == MISSING  # 1800 s x 1 process; no CUDA
    assert lora["FID (Inception)"] == "40.00"  # no bootstrap: no spread
    assert [lora[k] for k in ("FID (XRV)", "KID (XRV)", "Vendi (XRV)", "CLIP score")] == [MISSING] * 4
    assert report["records"][0]["fid_inception"] == 25.125 and report["records"][0]["gpu_hours"] == 8.0


def test_markdown_and_csv_agree(two_runs, tmp_path):
    report = run_compare(two_runs, tmp_path / "cmp")
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table = read_markdown_table(report["markdown"])
    assert [r["run"] for r in rows] == [r["run"] for r in table] == ["unet", "lora"]
    for row, shown in zip(rows, table):
        assert f"{int(row['trainable_parameters']):,}" == shown["trainable params"]
        assert f"{float(row['fid_inception']):.2f}" == shown["FID (Inception)"].split(" ± ")[0]
        assert f"{float(row['kid_inception']):.4f}" == shown["KID (Inception)"].split(" ± ")[0]
        assert f"{float(row['vendi_inception']):.2f}" == shown["Vendi (Inception)"]
        assert f"{float(row['gpu_hours']):.3g}" == shown["GPU-hours"]
        for column, header in (("fid_xrv", "FID (XRV)"), ("clip", "CLIP score"), ("peak_gpu_memory_gib", "peak mem (GiB)")):
            assert (row[column] == "") == (shown[header] == MISSING)  # missing: an empty cell, shown as —
    assert float(rows[0]["fid_xrv_std"]) == 0.125 and rows[1]["fid_inception_std"] == ""
    per_condition = list(csv.DictReader(open(tmp_path / "cmp" / "comparison_per_condition.csv")))
    assert [(r["run"], r["condition"], r["fid"]) for r in per_condition] == [("unet", "Cardiomegaly", "50.5"),
                                                                              ("unet", "Edema", "")]
    assert "| unet | 50.50 ± 2.50 | — |" in report["markdown"] and "| lora | — | — |" in report["markdown"]
    # compared again without the run that had per-condition FIDs: its old table does not stay behind
    (tmp_path / "cmp" / "notes.txt").write_text("mine")
    again = run_compare([two_runs[1]], tmp_path / "cmp")
    assert "per_condition_csv" not in again["files"] and not (tmp_path / "cmp" / "comparison_per_condition.csv").exists()
    assert (tmp_path / "cmp" / "notes.txt").read_text() == "mine"  # files compare does not own stay


def test_numbers_made_differently_are_flagged_as_not_comparable(two_runs, tmp_path, capsys):
    unet, lora = two_runs
    run_compare([unet, lora], tmp_path / "same")
    assert "NOT COMPARABLE" not in (tmp_path / "same" / "comparison.md").read_text()
    changed = json.loads((lora / "evaluation" / "inception.json").read_text())
    changed["features"]["version"] = "v; resize pil-bicubic"
    changed["real"] = {"source": "other/valid.csv", "kind": "table", "n": 100}
    (lora / "evaluation" / "inception.json").write_text(json.dumps(changed))
    run_compare([unet, lora], tmp_path / "differs")
    text = (tmp_path / "differs" / "comparison.md").read_text()
    assert "the Inception numbers differ in feature version and resize between runs (unet: v; lora: v; resize " \
           "pil-bicubic)" in text
    assert "the Inception numbers differ in real set between runs (unet: not recorded; lora: other/valid.csv)" in text
    assert "xrv" not in "".join(line for line in text.splitlines() if "NOT COMPARABLE" in line).lower()  # one run only


def test_clip_models_ms_ssim_sizes_and_optimizers_that_differ_are_noted(two_runs, tmp_path):
    unet, lora = two_runs

    def set_run(run, clip_model, ms_ssim_size, optimizer):
        results = json.loads((run / "extra.json").read_text()) if (run / "extra.json").is_file() else {}
        results["metrics"] = {"clip": {"value": 30.0, "model": clip_model, "n": 5},
                              "ms_ssim": {"mean": 0.3, "std": 0.1, "pairs": 10, "scales": 5 if ms_ssim_size >= 176 else 3,
                                          "image_size": [ms_ssim_size, ms_ssim_size]}}
        (run / "extra.json").write_text(json.dumps(results))
        data = json.loads((run / "training_summary.json").read_text())
        (run / "training_summary.json").write_text(json.dumps({**data, "optimizer": optimizer}))

    def flagged(name):
        text = run_compare([unet, lora], tmp_path / name, "--results", "extra.json")["markdown"]
        return [line for line in text.splitlines() if "NOT COMPARABLE" in line or "optimizers" in line]

    set_run(unet, "some/clip", 512, "bitsandbytes PagedAdamW8bit")
    set_run(lora, "some/clip", 512, "bitsandbytes AdamW8bit")  # paged or not, fused or not: the same maths
    assert flagged("same") == []
    set_run(lora, "hf-hub:BiomedCLIP", 64, "torch AdamW (fused)")
    lines = flagged("differs")
    assert len(lines) == 3, lines
    assert "the CLIP scores come from different models between runs (unet: some/clip; lora: hf-hub:BiomedCLIP)" in lines[0]
    assert "MS-SSIM was measured on other image sizes or scales between runs (unet: 512x512 px, 5 scales; lora: " \
           "64x64 px, 3 scales)" in lines[1]
    assert "different optimizers (unet: bitsandbytes AdamW8bit; lora: torch AdamW)" in lines[2]


def test_plots_are_valid_pngs(two_runs, tmp_path):
    report = run_compare(two_runs, tmp_path / "cmp", "--grid-images", "3")
    fid_plot, grid = Image.open(report["files"]["fid_vs_parameters"]), Image.open(report["files"]["sample_grid"])
    for image in (fid_plot, grid, Image.open(report["files"]["fid_vs_gpu_hours"])):
        assert image.format == "PNG"
        image.load()  # decodes completely
        assert np.asarray(image.convert("L")).std() > 0  # something is drawn
    assert fid_plot.width > 1.5 * fid_plot.height  # two panels: Inception and XRV


def test_fid_against_gpu_hours_places_each_run_at_its_compute(two_runs, tmp_path):
    report = run_compare(two_runs, tmp_path / "cmp", "--grid-images", "0")
    panels = plot_fid_against(report["records"], ["inception", "xrv"], "gpu_hours", tmp_path / "plot.png")
    # unet: 2 h wall x 4 processes (global batch 64 = 4 per device x 4 accumulation x 4); lora: 0.5 h x 1
    assert panels["inception"] == [(8.0, 25.125, 1.5, "unet"), (0.5, 40.0, None, "lora")]
    assert panels["xrv"] == [(8.0, 3.25, 0.125, "unet")]  # lora has no XRV results


def test_missing_metrics_and_results_are_dashes_never_a_crash(tmp_path, capsys):
    bare = write_run(tmp_path / "bare", {"status": "running", "strategy": {"name": "dora"}}, {})
    odd = write_run(tmp_path / "odd", summary("bitfit", 343_684, 0.032), {"results.json": {"not": "results"}})
    report = run_compare([bare, odd], tmp_path / "cmp")
    table = read_markdown_table(report["markdown"])
    assert table[0]["strategy"] == "dora"
    assert all(v == MISSING for k, v in table[0].items() if k not in ("run", "strategy"))
    assert table[1]["trainable params"] == "343,684" and table[1]["CLIP score"] == MISSING
    notes = report["markdown"]
    assert "bare: training status 'running'" in notes and "bare: no evaluation results" in notes
    assert "is not an evaluate.py results file" in notes and "fid_vs_parameters.png not written" in notes
    assert "fid_vs_gpu_hours.png not written: no run has both an FID and its GPU-hours of training" in notes
    assert not {"fid_vs_parameters", "fid_vs_gpu_hours", "sample_grid"} & set(report["files"])


def test_a_folder_without_summary_is_one_line_naming_it(two_runs, tmp_path, capsys):
    (tmp_path / "not-a-run").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "compare", str(two_runs[0]),
                             str(tmp_path / "not-a-run"), "--output-dir", str(tmp_path / "cmp")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: run {tmp_path / 'not-a-run'} has no training_summary.json: pass a training output folder "
        "(train_text_to_image.py writes the summary there)"]


def test_results_patterns_with_placeholders(two_runs, tmp_path, monkeypatch):
    evals = tmp_path / "evals" / "lora"
    evals.mkdir(parents=True)
    (evals / "a.json").write_text(json.dumps(results("inception", 12.0)))
    report = run_compare([two_runs[1]], tmp_path / "cmp", "--results", str(tmp_path / "evals" / "{name}" / "*.json"),
                         "--plots", "false")
    assert report["records"][0]["fid_inception"] == 12.0
    assert not (tmp_path / "cmp" / "fid_vs_parameters.png").exists()
    monkeypatch.chdir(tmp_path)  # {run} as given, relative here: not joined to the run folder a second time
    report = run_compare(["runs/lora"], "cmp2", "--results", "{run}/evaluation/*.json", "--plots", "false")
    assert report["records"][0]["fid_inception"] == 40.0


def test_processes_from_the_global_batch():
    assert processes(summary("unet", 1, 1.0, global_batch=128, batch=4, accumulation=4)) == 8
    assert processes({"global_batch_size": 8}) is None  # no per-device settings: unknown, not guessed


# ------------------------------------------------------------------------------- generate-samples


def test_generate_samples_writes_n_samples_and_a_consistent_grid(tiny_model, tmp_path, capsys):
    out = tmp_path / "samples"
    made = main(["--generate-samples", "--num-samples", "5", "--prompt", "Chest x-ray, with a comma",
                 "--model-path", str(tiny_model), "--output-dir", str(out), "--steps", "2", "--height", "32",
                 "--width", "48", "--device", "cpu"])
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 5 and all(Image.open(p).size == (48, 32) for p in pngs)
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    assert [r["prompt"] for r in rows] == ["Chest x-ray, with a comma"] * 5  # a comma does not split the prompt
    grid = Image.open(out / "grid.png")
    assert made["columns"] == 3  # ceil(sqrt(5))
    assert grid.size == (3 * 48 + 2 * 2, 2 * 32 + 1 * 2)  # 3 columns x 2 rows, 2 px gaps
    first = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert (np.asarray(grid.convert("RGB"))[:32, :48] == first).all()  # sample 0 is the top-left cell
    assert (np.asarray(grid.convert("RGB"))[:32, 48:50] == 255).all()  # a white gap


def test_generate_samples_matches_synthesize_images(tiny_model, tmp_path):
    """One sampling path: the same settings give the same pixels as synthesize_images.py."""
    from sdtune.synthesis import main as synthesize_main

    main(["--generate-samples", "--num-samples", "2", "--prompt", "a b", "--model-path", str(tiny_model),
          "--output-dir", str(tmp_path / "s"), "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"])
    synthesize_main(["--model-path", str(tiny_model), "--prompts", "a b", "--num-images", "2", "--output-dir",
                     str(tmp_path / "y"), "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"])
    for name in ("000000.png", "000001.png"):
        a = np.asarray(Image.open(tmp_path / "s" / "images" / name))
        assert (a == np.asarray(Image.open(tmp_path / "y" / "images" / name))).all()


def test_default_model_path_follows_the_tutorial_layout(tmp_path):
    with pytest.raises(UserError, match="no trained model in"):
        default_model_path(tmp_path)
    for run in ("lora", "unet"):
        (tmp_path / run / "final_model").mkdir(parents=True)
        (tmp_path / run / "final_model" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="2 trained models"):
        default_model_path(tmp_path)
    (tmp_path / "final_model").mkdir()
    (tmp_path / "final_model" / "model_index.json").write_text("{}")
    assert default_model_path(tmp_path) == str(tmp_path / "final_model")


def test_generate_samples_needs_a_prompt(tiny_model, tmp_path):
    with pytest.raises(UserError, match="--prompt is required"):
        main(["--generate-samples", "--model-path", str(tiny_model), "--output-dir", str(tmp_path)])


def test_image_grid_rows_and_columns():
    cells = [Image.new("RGB", (4, 3), (i, 0, 0)) for i in range(7)]
    grid = image_grid(cells, columns=3, gap=1)
    assert grid.size == (3 * 4 + 2, 3 * 3 + 2)
    assert grid.getpixel((0, 2 * 4)) == (6, 0, 0)  # the 7th image opens the third row
    assert grid.getpixel((grid.width - 1, grid.height - 1)) == (255, 255, 255)  # empty cells stay white


def test_sample_grid_spreads_over_the_set_and_titles_what_differs():
    assert spread(10, 4) == [0, 3, 6, 9] and spread(3, 8) == [0, 1, 2] and spread(5, 1) == [0]
    assert column_titles(["Chest x-ray with Edema", "Chest x-ray with no significant findings"]) == [
        "Edema", "no significant\nfindings"]


def test_downstream_auroc_columns_appear_when_a_run_has_them(two_runs, tmp_path):
    unet, lora = two_runs
    arms = {"a": {"mean_auroc": {"mean": 0.91, "std": 0.01, "n": 3}},
            "c": {"mean_auroc": {"mean": 0.8345, "std": 0.0125, "n": 3}},
            "d": {"mean_auroc": {"mean": 0.5712, "std": None, "n": 1}}}
    (unet / "downstream").mkdir()
    (unet / "downstream" / "downstream.json").write_text(json.dumps({"kind": "sdtune.downstream", "format": 1,
                                                                     "arms": arms}))
    report = run_compare(two_runs, tmp_path / "cmp")
    table = read_markdown_table((tmp_path / "cmp" / "comparison.md").read_text())
    assert table[0]["AUROC (c: scarce real + synthetic)"] == "0.835 ± 0.013"  # 0.8345 and 0.0125, 3 places
    assert table[0]["AUROC (d: synthetic only)"] == "0.571"
    assert table[1]["AUROC (c: scarce real + synthetic)"] == MISSING
    assert report["records"][0]["downstream_c"] == 0.8345 and report["records"][1]["downstream_d"] is None


def test_downstream_numbers_from_another_runs_images_are_noted(two_runs, tmp_path):
    unet, lora = two_runs
    sets = {}
    for run in (unet, lora):
        folder = tmp_path / "synthetic" / run.name
        (folder / "synthesis_config.json").write_text(json.dumps({"settings": {"model_path": str(run / "final_model")}}))
        sets[run.name] = str(folder)
    (unet / "downstream").mkdir()
    for used, noted in (([sets["unet"]], False), ([sets["unet"], sets["lora"]], True)):
        (unet / "downstream" / "downstream.json").write_text(json.dumps({
            "kind": "sdtune.downstream", "format": 1, "arms": {"c": {"mean_auroc": {"mean": 0.8, "std": None, "n": 1}}},
            "settings": {"synthetic": used}}))
        run_compare(two_runs, tmp_path / f"cmp-{noted}")
        text = (tmp_path / f"cmp-{noted}" / "comparison.md").read_text()
        note = f"unet: its downstream AUROC (c, d) used synthetic sets this run did not make: {sets['lora']} ({lora})"
        assert (note in text) == noted


def downstream_results(arms: dict[str, tuple], *, test_images=40, patients=10, arch="densenet121") -> dict:
    """downstream.json with arm -> (mean, std) of the mean AUROC, a test set and the classifier's settings."""
    return {"kind": "sdtune.downstream", "format": 1, "labels": ["Edema"],
            "arms": {a: {"mean_auroc": {"mean": m, "std": sd, "n": 3}} for a, (m, sd) in arms.items()},
            "counts": {"test": {"images": test_images, "patients": patients, "positives": {"Edema": 5}}},
            "settings": {"arch": arch, "resolution": 224, "epochs": 5, "seeds": [0, 1, 2], "labels": ["Edema"]}}


def test_the_real_only_baseline_fills_arms_a_and_b_of_every_row(two_runs, tmp_path):
    unet, lora = two_runs
    baseline = tmp_path / "downstream_real"
    baseline.mkdir()
    (baseline / "downstream.json").write_text(json.dumps(downstream_results({"a": (0.9125, 0.0025), "b": (0.75, 0.05)})))
    (unet / "downstream").mkdir()
    (unet / "downstream" / "downstream.json").write_text(json.dumps(downstream_results({"c": (0.8, 0.01), "d": (0.6, None)})))
    (lora / "downstream").mkdir()
    (lora / "downstream" / "downstream.json").write_text(json.dumps(downstream_results(
        {"a": (0.5, None), "c": (0.7, None)}, test_images=39, arch="resnet50")))
    report = run_compare(two_runs, tmp_path / "cmp", "--downstream-real", str(baseline))
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    table = read_markdown_table(text)
    a, b = "AUROC (a: all real)", "AUROC (b: scarce real)"
    assert (table[0][a], table[0][b]) == ("0.912 ± 0.003", "0.750 ± 0.050")  # the baseline's
    assert (table[1][a], table[1][b]) == ("0.500", "0.750 ± 0.050")  # lora's own a; the baseline's b
    assert table[0]["AUROC (c: scarce real + synthetic)"] == "0.800 ± 0.010"
    assert report["records"][1]["downstream_b"] == 0.75
    assert f"the real-only baseline {baseline / 'downstream.json'}" in text
    # lora's c was tested on other images by another classifier; unet's matches the baseline
    assert ("NOT COMPARABLE: lora's downstream arms (c, d) and the real-only baseline differ in test set, arch"
            in text) and "NOT COMPARABLE: unet's downstream" not in text
    # as many test images, other patients: another test set all the same
    (unet / "downstream" / "downstream.json").write_text(json.dumps(downstream_results({"c": (0.8, 0.01)}, patients=11)))
    text = run_compare(two_runs, tmp_path / "cmp2", "--downstream-real", str(baseline))["markdown"]
    assert "NOT COMPARABLE: unet's downstream arms (c, d) and the real-only baseline differ in test set:" in text


def test_the_study_differences_are_paired_across_the_baseline_and_each_run(two_runs, tmp_path):
    """The baseline's a, b and a run's c, d, on one test set: compare lists c − b, d − a, ... with paired
    intervals, computed from their predictions files."""
    from sdtune.downstream import prediction_rows

    unet, lora = two_runs
    rng = np.random.default_rng(0)
    targets = torch.from_numpy(rng.integers(0, 2, (40, 1)).astype(np.float32))
    rows, groups = [f"train.csv line {i + 2}" for i in range(40)], [f"patient{i // 2:05d}" for i in range(40)]
    logits = {arm: targets * strength + torch.from_numpy(rng.normal(size=(40, 1)).astype(np.float32))
              for arm, strength in (("a", 3.0), ("b", 1.0), ("c", 2.0), ("d", 0.5))}
    baseline = tmp_path / "downstream_real"
    for folder, arms in ((baseline, "ab"), (unet / "downstream", "cd")):
        folder.mkdir()
        data = downstream_results({a: (0.8, None) for a in arms})
        data["settings"].update(bootstrap=50, split_seed=0)
        (folder / "downstream.json").write_text(json.dumps(data))
        kept = {"targets": targets, **{(a, 0): logits[a] for a in arms}}
        (folder / "downstream_predictions.csv").write_text(prediction_rows(kept, rows, groups, ["Edema"]))
    text = run_compare(two_runs, tmp_path / "cmp", "--downstream-real", str(baseline))["markdown"]
    line = next(x for x in text.splitlines() if "unet: downstream differences" in x)
    c_minus_b = re.search(r"\(c\) − \(b\) ([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]", line)
    auroc = {a: roc_auc(logits[a][:, 0].numpy(), targets[:, 0].numpy()) for a in "abcd"}
    assert float(c_minus_b.group(1)) == pytest.approx(auroc["c"] - auroc["b"], abs=5e-4)
    assert float(c_minus_b.group(2)) <= float(c_minus_b.group(1)) <= float(c_minus_b.group(3))
    assert "(d) − (a)" in line and "lora: downstream differences" not in text  # lora has no downstream results
    (baseline / "downstream_predictions.csv").unlink()  # e.g. a baseline from before predictions were saved
    text = run_compare(two_runs, tmp_path / "cmp2", "--downstream-real", str(baseline))["markdown"]
    assert "unet: no downstream differences: its downstream_predictions.csv and the baseline's do not pair" in text


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """AUROC by comparing every positive with every negative (ties count half)."""
    pos, neg = scores[targets == 1], scores[targets == 0]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


@pytest.mark.parametrize(("content", "expected"), [
    (None, "no downstream.json there"),
    ({"kind": "sdtune.downstream", "arms": {"c": {}}}, "holds no real-only arm"),
    ({"metrics": {}}, "holds no real-only arm"),
])
def test_a_bad_downstream_baseline_is_one_line(two_runs, tmp_path, content, expected):
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    if content is not None:
        (baseline / "downstream.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match=expected):
        run_compare(two_runs, tmp_path / "cmp", "--downstream-real", str(baseline))
    assert not (tmp_path / "cmp").exists()  # nothing written


def test_downstream_numbers_on_seen_patients_or_other_labels_are_flagged(two_runs, tmp_path):
    unet, lora = two_runs
    seen = downstream_results({"c": (0.94, None)})
    seen["counts"]["test"]["generators_that_saw_it"] = [str(unet)]
    other = downstream_results({"c": (0.57, None)})
    other["labels"] = ["Edema", "Cardiomegaly"]
    for run, data in ((unet, seen), (lora, other)):
        (run / "downstream").mkdir()
        (run / "downstream" / "downstream.json").write_text(json.dumps(data))
    text = run_compare(two_runs, tmp_path / "cmp")["markdown"]
    assert f"unet: NOT COMPARABLE downstream AUROC: its test patients were in the training data of {unet}" in text
    assert "lora: NOT COMPARABLE downstream" not in text
    assert ("NOT COMPARABLE: the downstream mean AUROC averages other labels between runs "
            "(unet: Edema; lora: Edema, Cardiomegaly)") in text


@pytest.mark.parametrize("change, named", [
    (lambda d: d["settings"].update(arch="resnet50"), "arch"),
    (lambda d: d["settings"].update(epochs=20, seeds=[0]), "epochs, seeds"),
    (lambda d: d["counts"]["test"].update(rows_sha256="0123456789abcdef"), "test set"),  # as many, other images
])
def test_downstream_numbers_made_differently_between_runs_are_flagged(two_runs, tmp_path, change, named):
    """Without a baseline too: two strategies' arms (c, d) side by side must come from one recipe and test set."""
    unet, lora = two_runs
    same, other = downstream_results({"c": (0.8, None)}), downstream_results({"c": (0.7, None)})
    for data in (same, other):
        data["counts"]["test"]["rows_sha256"] = "fedcba9876543210"
    for run, data in ((unet, same), (lora, same)):
        (run / "downstream").mkdir()
        (run / "downstream" / "downstream.json").write_text(json.dumps(data))
    assert "NOT COMPARABLE" not in run_compare(two_runs, tmp_path / "alike")["markdown"]
    change(other)
    (lora / "downstream" / "downstream.json").write_text(json.dumps(other))
    text = run_compare(two_runs, tmp_path / "cmp")["markdown"]
    assert f"NOT COMPARABLE: the downstream AUROCs differ in {named} between runs" in text


def test_downstream_bootstrap_intervals_show_in_the_table_and_the_csv(two_runs, tmp_path):
    unet, lora = two_runs
    data = downstream_results({"c": (0.8, 0.01)})
    data["arms"]["c"]["mean_auroc"]["ci95"] = [0.7512, 0.8437]
    for run in (unet, lora):
        (run / "downstream").mkdir()
        (run / "downstream" / "downstream.json").write_text(json.dumps(data if run == unet else downstream_results(
            {"c": (0.7, 0.02)})))
    report = run_compare(two_runs, tmp_path / "cmp")
    table = read_markdown_table((tmp_path / "cmp" / "comparison.md").read_text())
    assert table[0]["AUROC (c: scarce real + synthetic)"] == "0.800 ± 0.010 [0.751, 0.844]"
    assert table[1]["AUROC (c: scarce real + synthetic)"] == "0.700 ± 0.020"  # run without a bootstrap
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert (float(rows["unet"]["downstream_c_ci_low"]), float(rows["unet"]["downstream_c_ci_high"])) == (0.7512, 0.8437)
    assert rows["lora"]["downstream_c_ci_low"] == "" and report["records"][1]["downstream_c_ci_high"] is None


def test_no_downstream_columns_without_downstream_results(two_runs, tmp_path):
    run_compare(two_runs, tmp_path / "cmp")
    assert "AUROC" not in (tmp_path / "cmp" / "comparison.md").read_text()
