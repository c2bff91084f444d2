"""Write the student edition of the book's notebooks (used by `make student`).

Usage: python .ci/student.py OUT_DIR NOTEBOOK [NOTEBOOK ...]

The student edition is generated, never edited: the marking lives in the chapters themselves, so
the two editions cannot drift apart. In each notebook:

* a code cell whose metadata has ``"student": {"stub": ["name", ...]}`` keeps each named top-level
  function's signature and docstring, and its body becomes ``raise NotImplementedError``; with
  ``"grader": "check_...(...)"`` a cell that runs that :mod:`bnbook.grading` check follows it;
* every ``{solution}`` block disappears from the Markdown, and each exercise is followed by an empty
  code cell for the answer;
* the code cells after the ``## Exercises`` heading (the checks behind the solutions) are dropped;
* every output is cleared.

``fill(student_nb, book_nb)`` puts the book's function bodies back (the "reference solutions"),
which is how the tests prove that a completed student notebook runs from top to bottom.
"""

from __future__ import annotations

import ast
import re
import sys
import zipfile
from pathlib import Path

import nbformat

SOLUTION_RE = re.compile(r"^(`{3,})\{solution\}.*?^\1[ \t]*\n?", re.M | re.S)
EXERCISE_RE = re.compile(r"^`{3,}\{exercise\}[^\n]*\n:label:\s*(\S+)", re.M)
EXERCISES_HEADING = re.compile(r"^##\s+Exercises\s*$", re.M)
STUB_BODY = 'raise NotImplementedError("write this function")'
GRADER_IMPORT = "from bnbook import grading\n\n"


def student_meta(cell) -> dict:
    return cell.get("metadata", {}).get("student", {}) if cell.cell_type == "code" else {}


def stub_functions(source: str, names: list[str]) -> str:
    """``source`` with the bodies of the named top-level functions replaced by a stub."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = node
    missing = set(names) - set(found)
    if missing:
        raise ValueError(f"stub names not defined at the top level of the cell: {sorted(missing)}")
    # Replace from the bottom up so that earlier line numbers stay valid.
    for node in sorted(found.values(), key=lambda n: n.lineno, reverse=True):
        body = node.body
        keep = (
            1
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            )
            else 0
        )
        start = body[keep].lineno - 1 if len(body) > keep else body[-1].end_lineno
        end = body[-1].end_lineno
        indent = " " * (body[0].col_offset)
        stub = f"{indent}# Your code here.\n{indent}{STUB_BODY}\n"
        lines[start:end] = [stub]
    return "".join(lines)


def strip_solutions(markdown: str) -> str:
    return SOLUTION_RE.sub("", markdown)


def make_student(book: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata=book.metadata)
    in_exercises = False
    for cell in book.cells:
        if cell.cell_type == "markdown":
            if EXERCISES_HEADING.search(cell.source):
                in_exercises = True
            text = strip_solutions(cell.source)
            if text.strip():
                nb.cells.append(nbformat.v4.new_markdown_cell(text))
            for label in EXERCISE_RE.findall(cell.source):
                nb.cells.append(
                    nbformat.v4.new_code_cell(f"# Exercise {label}: your answer here\n")
                )
            continue
        if cell.cell_type != "code" or (in_exercises and not student_meta(cell)):
            continue
        meta = student_meta(cell)
        source = stub_functions(cell.source, meta["stub"]) if meta.get("stub") else cell.source
        tags = [t for t in cell.metadata.get("tags", []) if t != "nbval-check-output"]
        new = nbformat.v4.new_code_cell(source, metadata={"tags": tags} if tags else {})
        if meta:
            new.metadata["student"] = dict(meta)
        nb.cells.append(new)
        if meta.get("grader"):
            grader = nbformat.v4.new_code_cell(GRADER_IMPORT + f"grading.{meta['grader']}")
            grader.metadata["student"] = {"grader_of": meta.get("stub", [])}
            nb.cells.append(grader)
    return nb


def fill(student: nbformat.NotebookNode, book: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The student notebook with every stubbed cell restored from the book (the reference answers)."""
    reference = [c for c in book.cells if student_meta(c).get("stub")]
    filled = nbformat.from_dict(student)
    stubbed = [c for c in filled.cells if student_meta(c).get("stub")]
    if len(reference) != len(stubbed):
        raise ValueError("the student notebook does not come from this book notebook")
    for cell, ref in zip(stubbed, reference, strict=True):
        cell.source = ref.source
    return filled


def write_edition(out_dir: Path, notebooks: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / "bnbook-student-notebooks.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in notebooks:
            student = make_student(nbformat.read(path, as_version=4))
            target = out_dir / Path(path).name
            nbformat.write(student, target)
            zf.write(target, f"bnbook-student/{target.name}")
    return archive


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    archive = write_edition(Path(sys.argv[1]), sys.argv[2:])
    print(f"student edition: {len(sys.argv) - 2} notebooks in {sys.argv[1]}, archive {archive}")
