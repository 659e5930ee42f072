"""Plain article text from a MediaWiki XML dump, split deterministically by article.

Markup is parsed with mwparserfromhell (templates, references and files dropped; link text kept);
a few line-level filters then remove table and list residue that survives ``strip_code``.
"""

from __future__ import annotations

import bz2
import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mwparserfromhell

SPLITS = ("train", "validation", "test")
# Fractions of articles per split. The split is decided by a hash of the title, so it does not
# depend on the order of the dump nor on which other articles are present.
_SPLIT_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
_MIN_CHARS = 500  # stubs and disambiguation pages carry little text worth scoring

_DROP_LINE = re.compile(r"^\s*(\{\||\|\}|\||!|\{\{|\}\}|=+|__\w+__|Category:|File:|Image:|thumb\||\[\[(File|Image):)")
# Residue of malformed markup that the parser leaves as text: an unclosed <ref> or template runs to
# the end of its line.
_RESIDUE = re.compile(r"<ref[^>]*>.*?(</ref>|$)|\{\{.*?(\}\}|$)")
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "citations", "footnotes"}


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def split_of(title: str) -> str:
    """Deterministic split for an article title: ~80% train, 10% validation, 10% test."""
    bucket = int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 100
    return next(name for name, r in _SPLIT_BUCKETS.items() if bucket in r)


def wikitext_to_plain(wikitext: str) -> str:
    """Strip MediaWiki markup; keep paragraphs and section titles, drop reference sections."""
    code = mwparserfromhell.parse(wikitext)
    # Reference-like sections (References, External links, ...) are lists of citations, not prose.
    for section in code.get_sections(include_lead=False, flat=True):
        headings = section.filter_headings(recursive=False)
        if headings and headings[0].title.strip_code().strip().lower() in _DROP_SECTIONS:
            _remove(code, section)
    # Remove templates, refs, tables and file links outright: strip_code would keep some of their text.
    for node in code.filter_templates(recursive=False):
        _remove(code, node)
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).lower() in {"ref", "table", "gallery", "math", "timeline", "imagemap", "references"}:
            _remove(code, tag)
    for link in code.filter_wikilinks(recursive=False):
        if str(link.title).split(":", 1)[0].strip().lower() in {"file", "image", "category", "media"} or \
                re.match(r"^[a-z]{2,3}(-[a-z]+)?:", str(link.title)):
            _remove(code, link)
    lines: list[str] = []
    for raw in code.strip_code(normalize=True, collapse=True).splitlines():
        line = raw.strip()
        if not line or _DROP_LINE.match(line):
            continue
        line = _RESIDUE.sub("", line).strip()
        if not line:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list markers
        line = re.sub(r"\s+", " ", line)
        if len(re.sub(r"[\W\d_]", "", line)) < 0.5 * len(line):  # mostly punctuation or numbers: table residue
            continue
        lines.append(line)
    return "\n".join(lines).strip()


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already removed together with a parent
        pass


def iter_articles(dump_bz2: Path) -> Iterator[Article]:
    """Main-namespace, non-redirect articles with at least ``_MIN_CHARS`` characters of text."""
    with bz2.open(dump_bz2, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            redirect = elem.find("{*}redirect") is not None
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            elem.clear()
            if ns != "0" or redirect or text.lstrip().lower().startswith("#redirect"):
                continue
            plain = wikitext_to_plain(text)
            if len(plain) >= _MIN_CHARS:
                yield Article(title=title, text=plain)
