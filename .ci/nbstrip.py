"""Strip a notebook's metadata to what the book needs (used by `make execute`).

Notebook level: kernelspec, language_info and the saved widget state only.
Cell level: everything but execution timing, collapse/scroll state and editor trivia.
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
    nbformat.validate(nb)
    nbformat.write(nb, path)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        strip(p)
