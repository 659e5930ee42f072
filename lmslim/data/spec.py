"""Data specs: one string that names a data set, accepted by every command.

A spec is one of:

- a text file or a folder of ``.txt``/``.md`` files (each file one document);
- ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` / ``.parquet`` with named columns
  (text: ``text``/``sentence``/``content``; label: ``label``; pairs: ``sentence1``/``sentence2``/``score``;
  token classification: ``tokens`` + ``tags``/``ner_tags`` lists);
- a CoNLL file for token classification (one token per line, its BIO tag in the last column, a blank
  line between sentences, ``-DOCSTART-`` lines ignored) — ``.conll`` or any text file with ``--task token-cls``;
- a fastText-style file for sequence classification (``__label__X text`` per line);
- ``builtin:wiki[:train|validation|test]``, ``builtin:polarity`` (200 labelled movie-review sentences),
  ``builtin:lee-sim`` (1225 news-document pairs with human similarity ratings);
- an HF dataset name (``name[:split]``, needs network and the ``hub`` extra).

Example:
    >>> from lmslim.data.spec import load_data
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"; _ = p.write_text("hello world")
    >>> load_data(str(p), task="clm").documents
    ['hello world']
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmslim.core.errors import UserError

TEXT_COLUMNS = ("text", "sentence", "content", "document")
LABEL_COLUMNS = ("label", "labels", "class")
TAG_COLUMNS = ("tags", "ner_tags", "labels")
_TEXT_SUFFIXES = {".txt", ".md", ".text", ".raw"}
_TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}


@dataclass
class Data:
    """Loaded data for one task; only the fields that task needs are filled."""

    spec: str
    task: str
    documents: list[str] = field(default_factory=list)  # clm, embed
    texts: list[str] = field(default_factory=list)  # seq-cls, embed (pairs: first side)
    texts_b: list[str] = field(default_factory=list)  # embed pairs: second side
    labels: list[Any] = field(default_factory=list)  # seq-cls labels, embed pair scores
    tokens: list[list[str]] = field(default_factory=list)  # token-cls
    tags: list[list[str]] = field(default_factory=list)  # token-cls

    def __len__(self) -> int:
        return len(self.documents or self.texts or self.tokens)


def load_data(spec: str, task: str = "clm", text_column: str | None = None, label_column: str | None = None) -> Data:
    """Load ``spec`` for ``task`` (clm, seq-cls, token-cls, embed); raise UserError on bad input."""
    if not spec or not spec.strip():
        raise UserError("empty data spec; give a file, a folder or builtin:wiki")
    if spec.startswith("builtin:"):
        data = _builtin(spec, task)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            data = _folder(spec, path, task)
        elif path.is_file():
            data = _file(spec, path, task, text_column, label_column)
        elif spec.startswith((".", "/", "~")) or path.suffix in _TEXT_SUFFIXES | _TABLE_SUFFIXES | {".conll"}:
            raise UserError(f"data path {spec} does not exist")
        else:
            data = _hub_dataset(spec, task, text_column, label_column)
    if len(data) == 0:
        raise UserError(f"data {spec} holds no usable examples for task {task}")
    return data


# ---------------------------------------------------------------------------------------------- builtins

def _builtin(spec: str, task: str) -> Data:
    from lmslim.assets.fetch import fetch_wiki
    from lmslim.assets.wiki import SPLITS

    name, _, split = spec.removeprefix("builtin:").partition(":")
    known = "builtin:wiki[:train|validation|test], builtin:polarity, builtin:lee-sim"
    if name == "wiki":
        split = split or "test"
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} of builtin:wiki; choose one of {', '.join(SPLITS)}")
        rows = _read_jsonl(fetch_wiki() / f"{split}.jsonl")
        if task not in ("clm", "embed"):
            raise UserError(f"builtin:wiki is plain text; it has no labels for task {task}")
        return Data(spec, task, documents=[r["text"] for r in rows])
    if name == "polarity" and not split:
        rows = _read_jsonl(fetch_wiki() / "polarity.jsonl")
        return _from_rows(spec, task, rows, None, None)
    if name == "lee-sim" and not split:
        rows = _read_jsonl(fetch_wiki() / "lee_pairs.jsonl")
        return _from_rows(spec, task, rows, None, None)
    raise UserError(f"unknown builtin data {spec!r}; choose one of: {known}")


# ---------------------------------------------------------------------------------------------- files

def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"data file {path} is empty")
    if b"\x00" in raw[:8192]:
        raise UserError(f"data file {path} is binary, not text; give a UTF-8 text, jsonl, csv or parquet file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from e


def _folder(spec: str, path: Path, task: str) -> Data:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
    if not files:
        raise UserError(f"data folder {spec} has no .txt or .md files")
    if task != "clm" and task != "embed":
        raise UserError(f"a folder of text files has no labels for task {task}; use jsonl/csv or CoNLL files")
    return Data(spec, task, documents=[t for t in (_read_text(f) for f in files) if t.strip()])


def _file(spec: str, path: Path, task: str, text_column: str | None, label_column: str | None) -> Data:
    suffix = path.suffix.lower()
    if suffix in _TABLE_SUFFIXES:
        return _from_rows(spec, task, _read_table(path), text_column, label_column)
    text = _read_text(path)
    if task == "token-cls" or suffix == ".conll":
        return _conll(spec, text, task)
    if task == "seq-cls":
        return _fasttext(spec, text)
    if task == "embed":
        return Data(spec, task, documents=[line.strip() for line in text.splitlines() if line.strip()])
    return Data(spec, task, documents=[text])


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{i} is not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i} is not a JSON object")
        rows.append(row)
    return rows


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            obj = json.loads(_read_text(path))
        except ValueError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from e
        if isinstance(obj, dict) and "data" in obj:
            obj = obj["data"]
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise UserError(f"{path} must hold a list of objects (or {{'data': [...]}})")
        return obj
    if suffix in (".csv", ".tsv"):
        text = _read_text(path)
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError("reading parquet needs pyarrow: pip install 'lmslim[parquet]'") from e
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise UserError(f"{path} is not a readable parquet file ({e})") from e


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, spec: str, flag: str) -> str:
    if wanted:
        if wanted not in columns:
            raise UserError(f"{spec} has no column {wanted!r}; columns are {columns}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise UserError(f"{spec} has no {what} column (looked for {', '.join(candidates)}); columns are {columns}; "
                    f"pass {flag}")


def _from_rows(spec: str, task: str, rows: list[dict], text_column: str | None, label_column: str | None) -> Data:
    if not rows:
        raise UserError(f"data {spec} has no rows")
    columns = list(rows[0].keys())
    if task == "token-cls":
        tok_col = _pick(columns, text_column, ("tokens", "words"), "tokens", spec, "--text-column")
        tag_col = _pick(columns, label_column, TAG_COLUMNS, "tags", spec, "--label-column")
        tokens = [list(map(str, r[tok_col])) for r in rows]
        tags = [list(map(str, r[tag_col])) for r in rows]
        for i, (a, b) in enumerate(zip(tokens, tags)):
            if len(a) != len(b):
                raise UserError(f"{spec} row {i + 1}: {len(a)} tokens but {len(b)} tags")
        return Data(spec, task, tokens=tokens, tags=tags)
    if task == "embed" and "sentence1" in columns and "sentence2" in columns:
        scores = [float(r["score"]) for r in rows] if "score" in columns else []
        return Data(spec, task, texts=[str(r["sentence1"]) for r in rows],
                    texts_b=[str(r["sentence2"]) for r in rows], labels=scores)
    text_col = _pick(columns, text_column, TEXT_COLUMNS, "text", spec, "--text-column")
    texts = [str(r[text_col]) for r in rows if r.get(text_col) not in (None, "")]
    if task == "seq-cls":
        label_col = _pick(columns, label_column, LABEL_COLUMNS, "label", spec, "--label-column")
        labels = [r[label_col] for r in rows if r.get(text_col) not in (None, "")]
        if any(lbl is None or lbl == "" for lbl in labels):
            raise UserError(f"{spec}: some rows have no {label_col!r} value")
        return Data(spec, task, texts=texts, labels=[str(lbl) for lbl in labels])
    return Data(spec, task, documents=texts)


def _fasttext(spec: str, text: str) -> Data:
    texts, labels = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        label, _, rest = line.strip().partition(" ")
        if not label.startswith("__label__"):
            raise UserError(f"{spec}:{i}: expected '__label__<name> text' for seq-cls text files; "
                            "or use jsonl/csv with text and label columns")
        texts.append(rest.strip())
        labels.append(label.removeprefix("__label__"))
    return Data(spec, "seq-cls", texts=texts, labels=labels)


def _conll(spec: str, text: str, task: str) -> Data:
    if task != "token-cls":
        raise UserError(f"{spec} is a CoNLL file; use it with --task token-cls")
    sentences: list[list[str]] = [[]]
    tags: list[list[str]] = [[]]
    for i, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if sentences[-1]:
                sentences.append([])
                tags.append([])
            continue
        if len(parts) < 2:
            raise UserError(f"{spec}:{i}: expected 'token ... TAG' (CoNLL layout), got {line.strip()!r}")
        tag = parts[-1]
        if not (tag == "O" or tag[:2] in ("B-", "I-", "E-", "S-")):
            raise UserError(f"{spec}:{i}: tag {tag!r} is not a BIO tag (O, B-X, I-X)")
        sentences[-1].append(parts[0])
        tags[-1].append(tag)
    if not sentences[-1]:
        sentences.pop()
        tags.pop()
    return Data(spec, task, tokens=sentences, tags=tags)


def _hub_dataset(spec: str, task: str, text_column: str | None, label_column: str | None) -> Data:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"data {spec!r} is not a local path; loading hub datasets needs pip install "
                        "'lmslim[hub]' and network access") from e
    try:
        ds = datasets.load_dataset(name, split=split or "test")
    except Exception as e:  # noqa: BLE001
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not load dataset {spec!r} ({first}); offline? give a local file or builtin:wiki") from e
    return _from_rows(spec, task, list(ds), text_column, label_column)
