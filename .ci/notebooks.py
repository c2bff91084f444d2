"""Print the book's notebooks in _toc.yml order, one path per line (used by the Makefile)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def toc_files(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Every `file:` entry of a jb-book table of contents, in reading order (root first)."""
    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def toc_notebooks(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """The toc entries that are notebooks, as paths relative to the repository root."""
    return [f + ".ipynb" for f in toc_files(toc_path) if (ROOT / (f + ".ipynb")).is_file()]


if __name__ == "__main__":
    sys.stdout.write("\n".join(toc_notebooks()) + "\n")
