"""Strip a notebook's metadata to what the book needs (used by `make execute`).

Notebook level: kernelspec, language_info and the saved widget state only.
Cell level: everything but execution timing, collapse/scroll state and editor trivia.
Outputs: consecutive stream outputs of the same stream are merged by plain concatenation. A loaded
kernel sometimes splits one print into two messages; myst-nb would then render a blank line
between them, while nbval (which concatenates) cannot tell the difference.
Usage: python .ci/nbstrip.py NOTEBOOK [NOTEBOOK ...]
"""

from __future__ import annotations

import sys

import nbformat

KEEP_NOTEBOOK = ("kernelspec", "language_info", "widgets")
DROP_CELL = (
    "execution",
    "collapsed",
    "scrolled",
    "ExecuteTime",
    "jupyter",
    "editable",
    "deletable",
)


def merge_streams(outputs: list) -> list:
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and out.get("output_type") == "stream"
            and prev.get("output_type") == "stream"
            and out.get("name") == prev.get("name")
        ):
            prev["text"] = "".join(prev["text"]) + "".join(out["text"])
        else:
            merged.append(out)
    return merged


def strip(path: str) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.metadata = nbformat.NotebookNode(
        {k: nb.metadata[k] for k in KEEP_NOTEBOOK if k in nb.metadata}
    )
    nb.metadata.kernelspec = nbformat.NotebookNode(
        {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    )
    for cell in nb.cells:
        for key in DROP_CELL:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    nbformat.validate(nb)
    nbformat.write(nb, path)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        strip(p)
