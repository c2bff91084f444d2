"""The student edition (`make student`, .ci/student.py): generated from the chapters, tested here.

Three properties, for every notebook of the book:
1. the student notebook runs without error up to its first stub (its code cells before the first
   stub are the book's own, which `make test` executes; the lab chapters are also executed here,
   up to the stub, which must then stop with NotImplementedError);
2. with the stubs filled by the reference solutions, it runs from top to bottom, graders included
   (for a lab, in the kernel of property 1: the pre-stub cells are not run twice);
3. no solution text appears in it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
import student  # noqa: E402  (.ci/student.py)
from notebooks import toc_files  # noqa: E402

NOTEBOOKS = [f + ".ipynb" for f in toc_files() if (ROOT / (f + ".ipynb")).is_file()]
BOOK = {path: nbformat.read(ROOT / path, as_version=4) for path in NOTEBOOKS}
LABS = [p for p, nb in BOOK.items() if any(student.student_meta(c).get("stub") for c in nb.cells)]


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


# --- the generator on a small notebook ------------------------------------------------------------

SOURCE = '''import numpy as np


def forward(x, gamma, beta, eps=1e-5):
    """The docstring stays."""
    mu = x.mean(axis=0)
    return gamma * (x - mu) / np.sqrt(x.var(axis=0) + eps) + beta


def helper(x):
    return x


y = forward(np.ones((2, 2)), 1.0, 0.0)
'''

EXERCISES = """## Exercises

```{exercise} A question
:label: ex-demo-1
Do it.
```

```{solution} ex-demo-1
:class: dropdown
The secret answer is forty-two, because of the following careful reasoning.
```
"""


def _demo_book():
    stub = nbformat.v4.new_code_cell(SOURCE)
    stub.metadata["student"] = {
        "stub": ["forward"],
        "grader": "check_batch_norm_forward(forward)",
    }
    check = nbformat.v4.new_code_cell("assert 42 == 6 * 7  # checks the solution")
    return nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# Demo"),
            stub,
            nbformat.v4.new_markdown_cell(EXERCISES),
            check,
        ]
    )


def test_generator_stubs_grades_and_strips():
    book = _demo_book()
    st = student.make_student(book)
    sources = "\n".join(c.source for c in st.cells)
    assert '"""The docstring stays."""' in sources
    assert "mu = x.mean(axis=0)" not in sources
    assert "def helper(x):\n    return x" in sources  # only the named function is stubbed
    assert student.STUB_BODY in sources
    assert "grading.check_batch_norm_forward(forward)" in sources
    assert "forty-two" not in sources and "{solution}" not in sources
    assert "{exercise} A question" in sources
    assert "# Exercise ex-demo-1: your answer here" in sources
    assert "checks the solution" not in sources  # code after ## Exercises is dropped
    filled = student.fill(st, book)
    assert "mu = x.mean(axis=0)" in "\n".join(_code(filled))


def test_generator_rejects_an_unknown_stub_name():
    with pytest.raises(ValueError, match="not defined at the top level"):
        student.stub_functions("def f():\n    return 1\n", ["g"])


# --- the book's own notebooks ---------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_no_solution_text_in_the_student_edition(path):
    book = BOOK[path]
    st = student.make_student(book)
    text = "\n".join(c.source for c in st.cells)
    assert "{solution}" not in text
    secrets = []
    for cell in book.cells:
        if cell.cell_type == "markdown":
            for match in student.SOLUTION_RE.finditer(cell.source + "\n"):
                body = match.group(0).splitlines()[1:-1]
                secrets += [ln.strip() for ln in body if len(ln.strip()) > 30]
        meta = student.student_meta(cell)
        for name in meta.get("stub", []):
            func = re.search(rf"^def {name}\(.*?(?=^\S|\Z)", cell.source, re.M | re.S).group(0)
            body = [ln.strip() for ln in func.splitlines()[1:] if ln.strip()]
            body = [ln for ln in body if not ln.startswith(('"""', "#"))]
            secrets.append("\n".join(body))
    # A line that the chapter's body also shows (a common line of code) is no secret.
    body = "\n".join(
        student.strip_solutions(c.source) if c.cell_type == "markdown" else c.source
        for c in book.cells
        if not student.student_meta(c).get("stub")
    )
    leaked = [s for s in secrets if s and s in text and s not in body]
    assert not leaked, f"{path}: solution text in the student edition: {leaked[:3]}"
    assert all(not o for c in st.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_student_code_before_the_first_stub_is_the_books(path):
    book, st = BOOK[path], student.make_student(BOOK[path])
    first = next(
        (
            i
            for i, c in enumerate(st.cells)
            if student.student_meta(c).get("stub") or c.source.startswith("# Exercise ex-")
        ),
        len(st.cells),
    )
    before = _code(nbformat.v4.new_notebook(cells=st.cells[:first]))
    assert before == _code(book)[: len(before)]


def test_the_lab_chapters_are_marked():
    assert {Path(p).stem for p in LABS} >= {
        "02_transform",
        "04_backprop",
        "05_inference",
        "06_conv",
        "11_family",
    }


@pytest.mark.parametrize("path", LABS)
def test_student_lab_stops_at_its_stub_and_runs_to_the_end_completed(path):
    """Properties 1 and 2 in one kernel: the code before the first stub runs, the stub (then its
    grader, or its own use) stops with NotImplementedError; the reference solution then replaces
    the stub and the completed notebook runs from there to the end, graders included."""
    st = student.make_student(BOOK[path])
    completed = student.fill(st, BOOK[path])
    first = next(i for i, c in enumerate(st.cells) if student.student_meta(c).get("stub"))
    client = NotebookClient(  # it files each cell it runs into its own copy of the notebook
        nbformat.from_dict(st),
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": ROOT}},
    )
    with client.setup_kernel():
        for i in range(first):  # the book's own code: every cell must run
            client.execute_cell(completed.cells[i], i)
        # The stub, then its grader (or its own use), must stop with NotImplementedError and no
        # other error: allowed meanwhile, the error is read from the cell's outputs.
        client.allow_errors, stopped = True, []
        for i in (first, first + 1):
            client.execute_cell(st.cells[i], i)
            stopped = [o.ename for o in st.cells[i].outputs if o.output_type == "error"]
            if stopped:
                break
        assert stopped == ["NotImplementedError"], (first, stopped)
        client.allow_errors = False
        for i in range(first, len(completed.cells)):
            client.execute_cell(completed.cells[i], i)
