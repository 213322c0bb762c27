"""Phantom chest X-rays in CheXpert's exact layout: an offline stand-in for CheXpert.

Not medical data. Every image is drawn from a few shapes (body, lungs, heart, mediastinum,
diaphragm, ribs, lung markings, noise) so that tests, examples and smoke runs of the toolkit
can read "CheXpert" without downloading it. Five findings are drawn so that they can be
seen and measured from the pixels alone:

    Cardiomegaly      heart wider: cardiothoracic ratio 0.52-0.62 (normal 0.38-0.46)
    Pleural Effusion  bright fluid with a horizontal upper edge filling one or both lung bases
    Pneumothorax      apex/lateral lung replaced by darker, marking-free air behind a thin
                      visceral pleural line
    Lung Opacity      patchy bright blobs inside the lungs
    Support Devices   endotracheal tube down the trachea and/or a central line

The other CheXpert labels appear in the CSVs with plausible frequencies but are not drawn.
Uncertain labels (-1.0) are drawn as positive (the U-Ones reading); blank labels as absent.

`measure_findings(image)` scores each drawn finding from an image alone (any size, a PIL
image or an array of any dtype), so a fine-tuned model's samples can be checked for the
finding it was prompted with; `SCORES` names the score of each finding.

    python -m sdtune.phantom OUT_DIR --n 200 --size 256 --seed 0

writes OUT_DIR/CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg
and OUT_DIR/CheXpert-v1.0-small/{train,valid}.csv (Path relative to OUT_DIR, as in CheXpert).
N counts all images: N - N // 10 go to train, N // 10 to valid; valid patients are new
patients with one study each (as in CheXpert's valid set); train patients have 1-4 studies.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter

from sdtune.errors import run_cli, writable_folder

LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + LABELS
DRAWN = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Lung Opacity", "Support Devices"]
# The measure_findings score that rises with each drawn finding.
SCORES = {"Cardiomegaly": "cardiothoracic_ratio", "Pleural Effusion": "effusion",
          "Pneumothorax": "pneumothorax", "Lung Opacity": "opacity", "Support Devices": "device"}

# Per label: P(1.0), P(-1.0), P(0.0); the rest is blank ("not mentioned"), as most CheXpert
# cells are. The drawn findings are positive in ~20-40% of studies so an AUROC means something.
PREVALENCE = {
    "Enlarged Cardiomediastinum": (0.06, 0.04, 0.10),
    "Cardiomegaly": (0.28, 0.04, 0.15),
    "Lung Opacity": (0.30, 0.03, 0.10),
    "Lung Lesion": (0.04, 0.01, 0.02),
    "Edema": (0.12, 0.05, 0.10),
    "Consolidation": (0.06, 0.08, 0.12),
    "Pneumonia": (0.03, 0.06, 0.03),
    "Atelectasis": (0.12, 0.12, 0.01),
    "Pneumothorax": (0.22, 0.02, 0.25),
    "Pleural Effusion": (0.30, 0.05, 0.15),
    "Pleural Other": (0.02, 0.01, 0.01),
    "Fracture": (0.04, 0.01, 0.01),
    "Support Devices": (0.35, 0.01, 0.03),
}
LATERAL_FRACTION = 0.17  # studies with a second, lateral view: ~14% of images, as in CheXpert
JPEG_QUALITY = 90
WORK = 256  # measurements resample every image to WORK x WORK


@dataclass
class Anatomy:
    """One patient's frontal geometry, in units of the image side (x to the right, y down).

    Radiological convention: the patient's right lung is on the image's left.
    """

    cx: float  # body midline
    hw: float  # half the internal thoracic width (inner rib margin at its widest)
    wall: float  # chest wall soft tissue outside the ribs
    apex: float  # lung apices
    base: float  # costophrenic angles (lowest lung point, laterally)
    dome: float  # height of the diaphragm domes above the costophrenic angles
    heart_y: float  # row of the heart's widest diameter
    ctr: float  # normal cardiothoracic ratio for this patient
    gain: float  # exposure: brightness of 1 unit of soft tissue
    rib_phase: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Anatomy:
        u = rng.uniform
        return cls(cx=0.5 + u(-0.015, 0.015), hw=u(0.33, 0.37), wall=u(0.05, 0.08),
                   apex=u(0.12, 0.16), base=u(0.76, 0.80), dome=u(0.05, 0.075),
                   heart_y=u(0.56, 0.60), ctr=u(0.38, 0.46), gain=u(140, 165),
                   rib_phase=u(0, 1))


# ---------------------------------------------------------------------------- rendering


def _blur(a: np.ndarray, sigma: float, sigma_x: float | None = None) -> np.ndarray:
    """Gaussian blur in pixels (scipy's is ~10x faster than numpy matrix products here)."""
    return gaussian_filter(np.asarray(a, np.float32), (sigma, sigma_x or sigma), mode="nearest")


def _lungs(a: Anatomy, ctr: float, x, y, margin: float = 0.0):
    """Boolean masks (patient right = image left, patient left) of the lung fields at (x, y).

    `margin` shrinks the fields from every border, to keep drawn blobs off them.
    """
    dx = x - a.cx
    t = np.clip((y - a.apex) / (a.base - a.apex), 0, 1)
    lateral = a.hw * (1 - 0.6 * (1 - np.clip(t / 0.55, 0, 1)) ** 2)  # narrow, rounded apices
    # Diaphragm: a parabola per side peaking at mid-lung; lowest laterally (costophrenic
    # angle). The right hemidiaphragm sits higher, under the liver.
    peak = 0.45 * a.hw
    dome = a.dome * (1 - ((np.abs(dx) - peak) / (a.hw - peak)) ** 2)
    diaphragm = a.base - dome - np.where(dx < 0, 0.02, 0.0)
    top = a.apex + 2.0 * (np.abs(dx) - 0.6 * a.hw) ** 2
    # Mediastinum, with the aortic knob bulging to the patient's left.
    knob = 0.025 * np.exp(-(((y - 0.30) / 0.035) ** 2)) * (dx > 0)
    mediastinum = np.abs(dx - 0.005) < 0.055 + knob + margin
    field = (np.abs(dx) < lateral - margin) & (y > top + margin) & (y < diaphragm - margin) & ~mediastinum
    field &= ~_heart(a, ctr, x, y, margin)
    return field & (dx < 0), field & (dx > 0)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in units of the image side."""
    c = ((np.arange(size) + 0.5) / size).astype(np.float32)
    return np.meshgrid(c, c)


def _heart(a: Anatomy, ctr: float, x, y, margin: float = 0.0):
    """Heart silhouette: an ellipse sheared so its apex points down to the patient's left,
    a third right of the midline, two thirds left. Its right border's furthest point from
    the midline plus its left border's is ctr x the internal thoracic width (2 hw)."""
    half_height, shear = 0.14, 0.3
    half = np.sqrt((ctr * a.hw) ** 2 - (shear * half_height) ** 2)  # sheared width = ctr * hw
    hx = x - a.cx - 0.3 * ctr * a.hw - shear * (y - a.heart_y)
    return (hx / (half + margin)) ** 2 + ((y - a.heart_y) / (half_height + margin)) ** 2 < 1


def _polyline_mask(x, y, points: np.ndarray, width: float) -> np.ndarray:
    """Pixels within width / 2 of a polyline (a tube or line drawn on the film)."""
    d2 = np.full(x.shape, np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
        t = np.clip(((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2), 0, 1)
        np.minimum(d2, (x - ax - t * (bx - ax)) ** 2 + (y - ay - t * (by - ay)) ** 2, out=d2)
    return d2 < (width / 2) ** 2


def _bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.array(p0) + 2 * t * (1 - t) * np.array(p1) + t**2 * np.array(p2)


def _markings(rng: np.random.Generator, size: int) -> np.ndarray:
    """Lung markings (vessels): the zero crossings of smooth noise make thin wandering lines,
    stretched vertically as the vessels fan down from the hila."""
    n = _blur(rng.standard_normal((size, size)).astype(np.float32), 0.02 * size, 0.008 * size)
    n /= n.std() + 1e-8
    return np.clip(1 - np.abs(n) / 0.45, 0, 1) ** 2


def _frontal(f: dict, a: Anatomy, size: int, rng: np.random.Generator) -> np.ndarray:
    """Attenuation map (1 = full soft-tissue thickness) of a frontal (PA/AP) chest film."""
    x, y = _grid(size)
    dx = x - a.cx
    ctr = rng.uniform(0.52, 0.62) if f["Cardiomegaly"] else a.ctr
    right, left = _lungs(a, ctr, x, y)
    lungs = right | left
    carina = a.heart_y - 0.27
    # The body is a rounded cylinder: X-rays cross less tissue near the skin, so it is darker.
    chest = a.hw + a.wall
    body_hw = np.interp(y, [0, 0.05, 0.09, 0.13, 0.19, 1],
                        [0.09, 0.10, 0.16, chest + 0.02, chest + 0.05, chest + 0.01])
    atten = np.clip((body_hw - np.abs(dx)) / 0.06, 0, 1) ** 0.5

    air = lungs.astype(np.float32)  # where X-rays cross aerated lung
    markings = _markings(rng, size) * (0.4 + np.exp(-np.hypot(np.abs(dx) - 0.1, y - carina - 0.1) / 0.1))

    if f["Pneumothorax"]:
        # The lung collapses toward its hilum; the pleural space it leaves is all air, with
        # no vessels, behind a thin visceral pleural line.
        s = rng.choice([-1.0, 1.0])
        side = right if s < 0 else left
        hx, hy = a.cx + s * 0.07, a.heart_y + 0.06
        k = rng.uniform(0.62, 0.78)

        def shrunk(q):  # that lung scaled by q toward its hilum
            return _lungs(a, ctr, hx + (x - hx) / q, hy + (y - hy) / q)[int(s > 0)] & side

        collapsed = shrunk(k)
        space = side & ~collapsed
        air += 0.2 * space
        markings *= ~space
        atten += 0.3 * (shrunk(k - 0.025) & ~collapsed)  # visceral pleural line

    if f["Pleural Effusion"]:
        # Fluid settles at the base with a horizontal upper edge and a slight lateral meniscus.
        sides = [right, left, lungs][rng.choice(3, p=[0.4, 0.4, 0.2])]
        level = a.base - rng.uniform(0.07, 0.13) - 0.06 * (np.abs(dx) / a.hw) ** 4
        fluid = sides & (y > level)
        air *= ~fluid
        markings *= ~fluid
        atten += 0.08 * fluid

    # Lungs are thinnest at their edges, so they darken gradually inward from the borders.
    atten -= 0.6 * _blur(air, 0.004 * size) * (0.75 + 0.25 * _blur(lungs.astype(np.float32), 0.03 * size))
    atten += 0.22 * markings * _blur(air, 0.01 * size)

    if f["Lung Opacity"]:
        # 1-3 patchy blobs centred off the heart border (the heart would look wider: the
        # silhouette sign) and above the lung bases (they would mimic blunted angles).
        centres = np.logical_or(*_lungs(a, ctr, x, y, margin=0.06)) & (y < a.base - 0.25)
        inside = _blur(np.logical_or(*_lungs(a, ctr, x, y, margin=0.03)), 0.005 * size)
        noise = _blur(rng.standard_normal((size, size)), 0.02 * size)  # std ~14 / size
        patchy = np.clip(0.8 + 0.025 * size * noise, 0.3, 1.2)
        density = np.zeros_like(x)
        for i in rng.choice(np.flatnonzero(centres), size=rng.integers(1, 4)):
            r = rng.uniform(0.04, 0.07)
            blob = np.exp(-((x - x.flat[i]) ** 2 + (y - y.flat[i]) ** 2) / (2 * r * r))
            density += rng.uniform(0.45, 0.6) * np.clip(1.8 * blob, 0, 1)
        atten += np.minimum(density, 0.6) * patchy * inside  # overlaps: no denser than water

    # Heart, spine (faint behind the mediastinum), posterior ribs, clavicles, tracheal air.
    above_diaphragm = y < a.base - 0.7 * a.dome
    atten += 0.1 * _blur((_heart(a, ctr, x, y) & above_diaphragm).astype(np.float32), 0.003 * size)
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * y / 0.045)
    atten += (0.08 + 0.05 * vert) * (np.abs(dx) < 0.032) * (y > 0.04)
    rib = np.cos(2 * np.pi * ((y + 0.12 * np.abs(dx) - 1.8 * dx**2) / 0.06 + a.rib_phase))
    ribcage = (np.abs(dx) > 0.04) & (np.abs(dx) < a.hw + 0.02) & (y > a.apex - 0.03) & (y < a.base - 0.02)
    atten += 0.10 * np.clip((rib - 0.45) / 0.55, 0, 1) * ribcage
    clavicle = np.abs(y - (a.apex + 0.05 - 0.28 * np.abs(dx) + 0.3 * dx**2)) < 0.012 + 0.02 * np.abs(dx)
    atten += 0.15 * (clavicle & (np.abs(dx) > 0.035) & (np.abs(dx) < 0.3))
    atten -= 0.25 * ((np.abs(dx) < 0.014) & (y < carina) & (y > 0.02))

    if f["Support Devices"]:
        tube = rng.random() < 0.7
        if tube:  # endotracheal tube, tip a few cm above the carina
            pts = np.array([[a.cx + 0.002, 0.0], [a.cx + 0.002, carina - rng.uniform(0.03, 0.06)]])
            atten += 0.8 * _polyline_mask(x, y, pts, 0.014)
        if not tube or rng.random() < 0.5:  # central venous line from a subclavian vein
            s = rng.choice([-1.0, 1.0])
            pts = _bezier((a.cx + s * 0.28, a.apex + 0.06), (a.cx + s * 0.06, a.apex + 0.04),
                          (a.cx - 0.03, carina + rng.uniform(0.05, 0.1)))
            atten += 0.8 * _polyline_mask(x, y, pts, 0.008)
    return atten


def _lateral(f: dict, a: Anatomy, size: int, rng: np.random.Generator) -> np.ndarray:
    """Attenuation map of a lateral film: anterior on the image's left, spine on the right."""
    x, y = _grid(size)
    body_hw = np.interp(y, [0, 0.06, 0.15, 1], [0.12, 0.2, 0.36, 0.38])
    atten = np.clip(1 - ((x - 0.52) / body_hw) ** 2, 0, 1) ** 0.3
    diaphragm = a.base - a.dome * (1 - ((x - 0.5) / 0.3) ** 2)  # deepest posteriorly
    lung = (np.abs(x - 0.53) / 0.28) ** 3 + (np.abs(y - 0.8) / (0.8 - a.apex)) ** 3 < 1
    lung &= y < diaphragm
    if f["Pleural Effusion"]:  # fluid fills the posterior costophrenic sulcus first
        lung &= y < a.base - rng.uniform(0.07, 0.13) - 0.1 * (x - 0.45)
    air = _blur(lung.astype(np.float32), 0.006 * size)
    atten -= 0.55 * air * (0.6 + 0.4 * _blur(lung.astype(np.float32), 0.03 * size))
    atten += 0.12 * _markings(rng, size) * air
    ctr = rng.uniform(0.52, 0.62) if f["Cardiomegaly"] else a.ctr
    heart = ((x - 0.36) / (0.3 * ctr)) ** 2 + ((y - a.heart_y - 0.03) / 0.14) ** 2 < 1
    atten += 0.3 * _blur((heart & lung).astype(np.float32), 0.02 * size)
    spine = (x > 0.8) & (x < 0.88) & (np.cos(2 * np.pi * y / 0.05) > -0.7)  # vertebral bodies
    atten += 0.2 * _blur(spine.astype(np.float32), 0.004 * size)
    atten += 0.12 * ((np.abs(x - 0.2 + 0.1 * (y - 0.2)) < 0.008) & (y > 0.2) & (y < 0.55))  # sternum
    if f["Lung Opacity"]:
        cx, cy = rng.uniform(0.4, 0.7), rng.uniform(0.3, 0.6)
        atten += 0.35 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.05**2)) * lung
    if f["Support Devices"]:
        atten += 0.5 * _polyline_mask(x, y, _bezier((0.45, 0.0), (0.47, 0.2), (0.50, 0.35)), 0.007)
    return atten


def render_chest_xray(findings: dict[str, bool], size: int = 256,
                      rng: np.random.Generator | None = None, *, lateral: bool = False,
                      anatomy: Anatomy | None = None) -> Image.Image:
    """One phantom chest film as an 8-bit grayscale (mode "L") image of size x size.

    `findings` maps CheXpert label names to present/absent; only the five in DRAWN are drawn,
    missing keys count as absent. `anatomy` fixes the patient (drawn from `rng` if omitted;
    `rng` defaults to fresh entropy).
    """
    unknown = set(findings) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown finding(s) {sorted(unknown)}: use CheXpert's label names {LABELS}")
    rng = rng if rng is not None else np.random.default_rng()
    f = {k: bool(findings.get(k, False)) for k in DRAWN}
    anatomy = anatomy or Anatomy.sample(rng)
    atten = (_lateral if lateral else _frontal)(f, anatomy, size, rng)
    atten = _blur(atten, 0.0025 * size)  # focal spot and detector blur
    pixels = 12 + anatomy.gain * atten + 3.0 * rng.standard_normal((size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="L")


# ---------------------------------------------------------------------------- measurement


def _as_array(image) -> np.ndarray:
    """Float WORK x WORK grayscale copy, blurred a little, 1st-99th percentile scaled to 0-1.

    Takes a PIL image of any mode or an array (uint8, 16-bit or float; HxW or HxWxC): the
    percentile scaling makes the value range irrelevant.
    """
    if isinstance(image, Image.Image):
        # 16-bit and float modes are read as numbers: .convert("L") would clip them.
        numeric = image.mode in ("I", "F") or image.mode.startswith("I;16")
        image = np.asarray(image if numeric else image.convert("L"))
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(-1)
    a = np.asarray(Image.fromarray(a, mode="F").resize((WORK, WORK), Image.BILINEAR))
    a = _blur(a, 1.0)
    lo, hi = np.percentile(a, [1, 99])
    return (a - lo) / max(hi - lo, 1e-6)


def _otsu(values: np.ndarray) -> float:
    """Threshold that best splits values into two classes (Otsu 1979)."""
    hist, edges = np.histogram(values, bins=64)
    p = hist / hist.sum()
    w0 = np.cumsum(p)
    mu = np.cumsum(p * (edges[:-1] + edges[1:]) / 2)
    between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0) + 1e-12)
    return float(edges[1:][np.argmax(between[:-1])])


@dataclass
class Lungs:
    """Lung fields found from the pixels alone (see `find_lungs`)."""

    image: np.ndarray  # WORK x WORK, 1st-99th percentile scaled to 0-1
    right: np.ndarray  # patient's right lung (image left), bool WORK x WORK
    left: np.ndarray  # patient's left lung (image right)
    midline: float  # column of the body's midline
    level: float  # Otsu threshold between lung and soft tissue


def find_lungs(image) -> Lungs:
    """Body = per row, the span between the first and last column brighter than the Otsu
    threshold of the whole image; lungs = pixels inside it darker than the Otsu threshold of
    the body, with brighter chest wall between them and the body's (also dark) rim."""
    a = _as_array(image)
    bright = a > _otsu(a.ravel())
    cols = np.arange(WORK)
    first = np.where(bright.any(1), bright.argmax(1), WORK)
    last = np.where(bright.any(1), WORK - 1 - bright[:, ::-1].argmax(1), -1)
    midline = float(np.median(((first + last) / 2)[bright.sum(1) > WORK // 4]))
    inside = (cols >= first[:, None]) & (cols <= last[:, None])
    level = _otsu(a[inside])
    wall = a > level
    walled = np.maximum.accumulate(wall, 1) & np.maximum.accumulate(wall[:, ::-1], 1)[:, ::-1]
    dark = inside & walled & (a < level)
    gap = 0.04 * WORK  # drop the trachea and anything else straddling the midline
    return Lungs(a, dark & (cols < midline - gap), dark & (cols > midline + gap), midline, level)


def _edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first and last column of mask (-1 where the row is empty)."""
    cols = np.arange(mask.shape[1])
    has = mask.any(1)
    return (np.where(has, np.where(mask, cols, WORK).min(1), -1),
            np.where(has, np.where(mask, cols, -1).max(1), -1))


def _heart_border(lung: np.ndarray, medial: np.ndarray, outward: int) -> np.ndarray:
    """Rows where the lung's medial edge is the heart (or mediastinum), not the diaphragm:
    lung continues a little lower, at or just lateral to that edge."""
    rows = np.arange(WORK)
    below = np.clip(rows + int(0.02 * WORK), 0, WORK - 1)
    cols = np.clip(medial[:, None] + outward * np.arange(int(0.01 * WORK) + 1), 0, WORK - 1)
    return (medial >= 0) & lung[below[:, None], cols].any(1)


def measure_findings(image) -> dict[str, float]:
    """Scores of the five drawn findings, from an image alone (PIL image or uint8 array).

    cardiothoracic_ratio  (furthest right heart border from the midline + furthest left) /
                          widest internal thoracic width, as a radiologist measures it:
                          ~0.42 normal, > 0.5 cardiomegaly
    effusion              rise of each lung's floor toward its lateral edge, where a normal
                          floor dips into the costophrenic angle (blunting, meniscus): < 0
                          normal, > 0 effusion
    pneumothorax          how much darker the outer rim of the upper lung is than its inner
                          part (pleural air has no lung tissue or vessels): ~0 normal
    opacity               fraction of the lung fields (each lung's row-wise hull) that is
                          dense: halfway from aerated lung to soft tissue, or more
    device                mean of the strongest 0.2% thin-ridge responses (tubes, lines)
    All are NaN when no pair of lung fields is found.
    """
    lungs = find_lungs(image)
    a, right, left, mid = lungs.image, lungs.right, lungs.left, lungs.midline
    rows, cols = np.arange(WORK)[:, None], np.arange(WORK)[None, :]
    r_out, r_in = _edges(right)
    l_in, l_out = _edges(left)
    both = (r_in >= 0) & (l_in >= 0)
    if both.sum() < 0.1 * WORK:
        return dict.fromkeys(SCORES.values(), np.nan)
    scores = {}

    # Cardiothoracic ratio (Danzer 1919). The heart borders are the lungs' medial edges below
    # the upper third of the fields (above lie the apices and the aortic knob).
    thorax = (l_out - r_out)[both].max()
    field = np.flatnonzero(both)
    lower = np.arange(WORK) > field[0] + 0.35 * (field[-1] - field[0])
    mrd = (mid - r_in)[lower & _heart_border(right, r_in, -1)].max(initial=0)
    mld = (l_in - mid)[lower & _heart_border(left, l_in, 1)].max(initial=0)
    scores["cardiothoracic_ratio"] = float((mrd + mld) / thorax)

    # Effusion: how much each lung's floor rises toward its lateral edge, from 12-22% of
    # the lung's width in (the deepest point there: a large heart may cover the inner
    # columns) to 5%; a normal floor drops there into the costophrenic angle instead.
    rise = []
    for lung, outward in ((right, -1), (left, 1)):
        floor = np.where(lung, rows, -1).max(0)  # lowest lung row per column
        present = np.flatnonzero(lung.sum(0) > 0.02 * WORK)
        edge = present.min() if outward < 0 else present.max()
        at = lambda f: np.round(edge - outward * np.asarray(f) * abs(edge - mid)).astype(int)  # noqa: E731
        rise.append((floor[at(np.linspace(0.12, 0.22, 6))].max() - floor[at(0.05)]) / thorax)
    scores["effusion"] = float(max(rise))

    # Pneumothorax: outer rim (outer 30% of each row, and the apex) of the upper lung versus
    # its inner part, both without dense patches.
    dense = a > (np.median(a[right | left]) + lungs.level) / 2
    rim = []
    for lung, lat, med in ((right, r_out, r_in), (left, l_out, l_in)):
        span = np.flatnonzero(lung.any(1))
        top, height = span[0], span[-1] - span[0]
        depth = np.abs(cols - lat[:, None]) / np.maximum(np.abs(med - lat), 1)[:, None]
        upper = lung & ~dense & (rows < top + 0.7 * height)
        apex = rows < top + 0.15 * height
        outer, inner = upper & ((depth < 0.3) | apex), upper & (depth > 0.45) & ~apex
        if outer.sum() > 20 and inner.sum() > 20:
            rim.append(np.median(a[inner]) - np.median(a[outer]))
    scores["pneumothorax"] = float(max(rim, default=np.nan))

    # Opacity: dense pixels inside each lung's row-wise hull (the hull keeps blobs that cut
    # holes in the lung mask).
    hull = (cols >= r_out[:, None]) & (cols <= r_in[:, None]) & (r_in >= 0)[:, None]
    hull |= (cols >= l_in[:, None]) & (cols <= l_out[:, None]) & (l_in >= 0)[:, None]
    scores["opacity"] = float((hull & dense).sum() / hull.sum())

    # Device: ridges brighter than both neighbours d pixels away, across or along the rows
    # (tubes and lines are thinner than bones and brighter than vessels), searched between
    # the lungs' lateral edges, from the neck down to the lung bases.
    d = max(2, int(0.012 * WORK))
    ridge = np.maximum(*(np.minimum(a - np.roll(a, d, ax), a - np.roll(a, -d, ax)) for ax in (0, 1)))
    span = (cols > r_out[both].min() + d) & (cols < l_out[both].max() - d) & (rows > d) & (rows < field[-1])
    top = np.sort(ridge[span])[-int(0.002 * WORK * WORK):]
    scores["device"] = float(top.mean())
    return scores


# ---------------------------------------------------------------------------- dataset


def _labels(rng: np.random.Generator) -> dict[str, float]:
    """One study's labels, CheXpert conventions: 1.0, 0.0, -1.0 or NaN (blank)."""
    normal = rng.random() < 0.12  # about a tenth of CheXpert's studies are "No Finding"
    out = {}
    for name, (pos, unc, neg) in PREVALENCE.items():
        if normal and name != "Support Devices":
            pos = unc = 0.0
        out[name] = rng.choice([1.0, -1.0, 0.0, np.nan], p=[pos, unc, neg, 1 - pos - unc - neg])
    # CheXpert: No Finding is positive when no pathology is positive or uncertain (support
    # devices are not a pathology); otherwise it is left blank.
    pathology = [out[k] for k in LABELS[1:-1]]
    out["No Finding"] = 1.0 if not any(v in (1.0, -1.0) for v in pathology) else np.nan
    return out


def _plan(n: int, rng: np.random.Generator) -> list[dict]:
    """Patients, studies and views for n images: train patients with 1-4 studies, then valid
    patients with one study each (as in CheXpert), patient numbers never shared."""
    n_valid = n // 10
    plan, patient = [], 0
    for split, n_split, max_studies in (("train", n - n_valid, 4), ("valid", n_valid, 1)):
        left = n_split
        while left > 0:
            patient += 1
            n_studies = min(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.25, 0.15]), max_studies)
            sex = rng.choice(["Male", "Female", "Unknown"], p=[0.55, 0.44, 0.01])
            age = int(rng.integers(18, 88))
            for study in range(1, n_studies + 1):
                views = 2 if rng.random() < LATERAL_FRACTION else 1
                ap = rng.choice(["AP", "PA"], p=[0.75, 0.25])
                for view in range(1, min(views, left) + 1):
                    plan.append(dict(split=split, patient=patient, study=study, view=view,
                                     sex=sex, age=min(age + study - 1, 90), ap=ap))
                    left -= 1
                if left == 0:
                    break
    return plan


def write_phantom_chexpert(out_dir, n: int = 200, size: int = 256, seed: int = 0) -> Path:
    """Write n phantom images and train.csv/valid.csv in CheXpert-v1.0-small's layout.

    Returns out_dir; CSV Paths are relative to it. Same arguments give byte-identical files.
    """
    out_dir = Path(out_dir)
    root = out_dir / "CheXpert-v1.0-small"
    rows = {"train": [], "valid": []}
    for item in _plan(n, np.random.default_rng([seed, 0])):
        p, st, vw = item["patient"], item["study"], item["view"]
        # Each study, patient and image has its own generator, so nothing depends on order.
        labels = _labels(np.random.default_rng([seed, 1, p, st]))
        anatomy = Anatomy.sample(np.random.default_rng([seed, 2, p]))
        lateral = vw == 2
        findings = {k: labels[k] in (1.0, -1.0) for k in DRAWN}  # U-Ones: uncertain is drawn
        img = render_chest_xray(findings, size, np.random.default_rng([seed, 3, p, st, vw]),
                                lateral=lateral, anatomy=anatomy)
        rel = Path(root.name, item["split"], f"patient{p:05d}", f"study{st}",
                   f"view{vw}_{'lateral' if lateral else 'frontal'}.jpg")
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(out_dir / rel, quality=JPEG_QUALITY)
        rows[item["split"]].append({
            "Path": rel.as_posix(), "Sex": item["sex"], "Age": item["age"],
            "Frontal/Lateral": "Lateral" if lateral else "Frontal",
            "AP/PA": ("LL" if p % 3 == 0 else "") if lateral else item["ap"], **labels})
    for split, r in rows.items():
        pd.DataFrame(r, columns=COLUMNS).to_csv(root / f"{split}.csv", index=False)
    config = dict(generator="sdtune.phantom", n=n, size=size, seed=seed, jpeg_quality=JPEG_QUALITY)
    (out_dir / "phantom.json").write_text(json.dumps(config, indent=1) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sdtune.phantom", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n", type=int, default=200, help="images in all; a tenth go to valid")
    p.add_argument("--size", type=int, default=256, help="side of the square images, px")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 1 or not 32 <= args.size <= 4096:
        p.error("need --n >= 1 and --size from 32 to 4096")
    writable_folder(args.out_dir, "OUT_DIR")
    out = write_phantom_chexpert(args.out_dir, args.n, args.size, args.seed)
    root = out / "CheXpert-v1.0-small"
    train, valid = (pd.read_csv(root / f"{s}.csv") for s in ("train", "valid"))
    patients = {p.split("/")[2] for p in pd.concat([train, valid]).Path}
    print(f"wrote {len(train)} train + {len(valid)} valid images ({len(patients)} patients, "
          f"{args.size}x{args.size}, seed {args.seed}) to {root}")


if __name__ == "__main__":
    run_cli(main)
