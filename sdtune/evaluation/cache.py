"""Features of file-based image sets, cached on disk so that eleven runs read the real set once.

The key hashes the extractor (name, version, resize), the source of the modules that decode and
resize the images (a toolkit update that changes them never reads old features), and every file's
path, size, modification and change times and inode (sdtune.data.records.file_stamp): change, add,
remove, touch or replace any file, even keeping its size and modification time, and the key
changes, so a stale entry is never read (it is simply never looked up again). Entries are written
to a temporary name and renamed, so an interrupted run never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch

from sdtune.data.records import file_stamp
from sdtune.provenance import code_digest

CACHE_FORMAT = 1  # bump when what an entry holds changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "sdtune" / "features"


# The code between a file and its features: decoding, cropping and resizing (and the extractor's own).
FEATURE_CODE = ("sdtune.data.images", "sdtune.evaluation.images", "sdtune.evaluation.features")


def cache_key(files: list[Path], extractor_info: dict) -> str:
    head = {"format": CACHE_FORMAT, "code": code_digest(*FEATURE_CODE), **extractor_info}
    digest = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for file in files:
        digest.update(f"{file_stamp(file)}\n".encode())
    return digest.hexdigest()


class FeatureCache:
    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder).expanduser() if folder else default_cache_dir()

    def load(self, key: str) -> torch.Tensor | None:
        path = self.folder / f"{key}.npy"
        if not path.is_file():
            return None
        try:
            return torch.from_numpy(np.load(path)).double()
        except (OSError, ValueError):  # unreadable entry: recompute it
            return None

    def save(self, key: str, features: torch.Tensor, about: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.npy"
        # A name of this process's own (machines sharing the folder may reuse a pid), then renamed.
        unique = f"{socket.gethostname()}.{os.getpid()}"
        tmp = path.with_name(f"{key}.{unique}.tmp.npy")
        # Networks compute in float32: then float32 stores their output exactly, at half the size.
        exact = torch.equal(features.float().double(), features.double())
        np.save(tmp, (features.float() if exact else features.double()).numpy())
        os.replace(tmp, path)
        about_tmp = self.folder / f"{key}.{unique}.tmp.json"
        about_tmp.write_text(json.dumps({**about, "shape": list(features.shape)}, indent=1) + "\n")
        os.replace(about_tmp, self.folder / f"{key}.json")
        return path
