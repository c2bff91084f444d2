"""Tag the cells whose outputs depend neither on the CPU's kernels nor on the draw (`make stable-cells`).

Usage: python .ci/stable_cells.py STORED.ipynb PERTURBED.ipynb [PERTURBED.ipynb ...]

STORED is a chapter as committed; each PERTURBED is the same chapter executed differently:
`make stable-cells` executes it on another kernel path (KERNEL_ENV) and under another base seed
(BNBOOK_SEED=1). A code cell whose outputs, sanitized as nbval sanitizes them, are the same in all
of them gets the tag `nbval-check-output`, and `make test` compares it exactly on every machine;
any other cell loses the tag, and only its asserts are tested. Requiring both is deliberate: a
training result can survive a small kernel perturbation on one machine and still move on another
CPU, but an output that does not change with the random draw either is a derivation, an identity,
a shape or a message. Cells without output, cells that deliberately raise, and cells tagged
nbval-ignore-output are never tagged.
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

import nbformat

TAG = "nbval-check-output"
SANITIZE = Path(__file__).resolve().parent.parent / "chapters" / "nbval_sanitize.cfg"
COMPARED_TYPES = ("text/plain", "text/html", "text/markdown", "text/latex")


def sanitizers() -> list[tuple[re.Pattern, str]]:
    cfg = configparser.ConfigParser()
    cfg.read(SANITIZE)
    return [(re.compile(cfg[s]["regex"]), cfg[s]["replace"]) for s in cfg.sections()]


def signature(cell, rules) -> list[str]:
    """What nbval compares of a cell's outputs (text of streams, errors and text data)."""
    parts, stream = [], None  # consecutive chunks of one stream are one output, as nbval sees it
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            text = "".join(out["text"])
            if stream == out["name"]:
                parts[-1] += text
            else:
                parts.append(f"{out['name']}:{text}")
            stream = out["name"]
            continue
        stream = None
        if out.get("output_type") == "error":
            parts.append(f"error:{out['ename']}:{out['evalue']}")
        else:
            data = out.get("data", {})
            for key in sorted(data):
                if key in COMPARED_TYPES or key.startswith("application/papermill"):
                    parts.append(f"{key}:{data[key]!s}")
    text = "\n".join(parts)
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text.splitlines()


def retag(stored_path: str, perturbed_paths: list[str]) -> tuple[int, int]:
    stored = nbformat.read(stored_path, as_version=4)
    runs = [nbformat.read(p, as_version=4) for p in perturbed_paths]
    for path, run in zip(perturbed_paths, runs, strict=True):
        if len(run.cells) != len(stored.cells):
            raise SystemExit(f"{path} is not an execution of {stored_path}: cell counts differ")
    rules = sanitizers()
    tagged = total = 0
    for i, a in enumerate(stored.cells):
        if a.cell_type != "code":
            continue
        tags = [t for t in a.metadata.get("tags", []) if t != TAG]
        eligible = (
            a.get("outputs")
            and "raises-exception" not in tags
            and "nbval-ignore-output" not in tags
        )
        total += 1
        same = all(signature(a, rules) == signature(run.cells[i], rules) for run in runs)
        if eligible and same:
            tags.append(TAG)
            tagged += 1
        if tags:
            a.metadata["tags"] = tags
        else:
            a.metadata.pop("tags", None)
    nbformat.write(stored, stored_path)
    return tagged, total


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    n, m = retag(sys.argv[1], sys.argv[2:])
    print(f"{sys.argv[1]}: {n} of {m} code cells compared exactly on every machine")
