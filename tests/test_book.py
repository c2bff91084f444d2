"""Book-wide checks over the committed notebooks and pages (no kernel, no build needed).

What nbval cannot see: that the toc and the disk agree, that each notebook is stored executed in
order and clean, that every figure is captioned and described, that widgets have their static
figure, that headings nest, and that every launch path points at the one configured repository.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
from notebooks import toc_files  # noqa: E402  (.ci/notebooks.py, also used by the Makefile)

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPO_URL = CONFIG["repository"]["url"].rstrip("/")
TOC_FILES = toc_files()
TOC_NOTEBOOKS = [f + ".ipynb" for f in TOC_FILES if (ROOT / (f + ".ipynb")).is_file()]
TOC_PAGES = [f + ".md" for f in TOC_FILES if (ROOT / (f + ".md")).is_file()]
DISK_NOTEBOOKS = sorted(
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "chapters").rglob("*.ipynb")
    if ".ipynb_checkpoints" not in p.parts
)
CHAPTER_RE = re.compile(r"chapters/\d\d_[a-z0-9_]+\.ipynb$")

# The first code cell of every notebook (CONTRIBUTING.md), e.g.
SETUP_CELL_EXAMPLE = f"""import sys

if "google.colab" in sys.modules:  # on Colab only: install the book's package
    import subprocess

    pkg = "bnbook @ git+{REPO_URL}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", pkg], check=True)
import bnbook

bnbook.setup_notebook(seed=0)"""

MAX_OUTPUT_LINES = 60
# A path on some machine: a home, temporary, system or environment folder, or a Windows drive.
PATH_RE = re.compile(
    r"(/(home|root|tmp|work|usr|opt|var|Users|private)/[\w.-]"
    r"|site-packages|dist-packages|\.venv|[A-Za-z]:\\\\?[\w ]+\\)"
)
ADDRESS_RE = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
WARNING_RE = re.compile(r"\b\w*Warning\b[:(]|\bwarnings\.warn\b|^\s*warn(ing)?:", re.I | re.M)
NOTEBOOK_METADATA = {"kernelspec", "language_info", "widgets"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
IMAGE_TYPES = ("image/png", "image/jpeg")


def _read(path: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / path, as_version=4)


def _text_of(output) -> str:
    """The human-readable text of an output (what a reader sees, what nbval compares)."""
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return "\n".join(output.traceback)
    data = output.get("data", {})
    return "\n".join(data[k] for k in ("text/plain", "text/markdown", "text/latex") if k in data)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _tags(cell) -> set[str]:
    return set(cell.metadata.get("tags", []))


needs_notebooks = pytest.mark.skipif(not TOC_NOTEBOOKS, reason="no notebook in _toc.yml yet")


# --- the table of contents ------------------------------------------------------------------------
def test_toc_and_disk_agree():
    missing = [
        f for f in TOC_FILES if not any((ROOT / (f + s)).is_file() for s in (".md", ".ipynb"))
    ]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"
    assert len(TOC_FILES) == len(set(TOC_FILES)), "a file is listed twice in _toc.yml"
    unlisted = sorted(set(DISK_NOTEBOOKS) - set(TOC_NOTEBOOKS))
    assert not unlisted, f"notebooks on disk but not in _toc.yml: {unlisted}"
    unlisted_pages = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "chapters").glob("*.md")
        if p.relative_to(ROOT).as_posix() not in TOC_PAGES
    )
    assert not unlisted_pages, f"pages on disk but not in _toc.yml: {unlisted_pages}"


def test_chapters_in_toc_order_follow_their_numbers():
    numbers = [int(Path(nb).name[:2]) for nb in TOC_NOTEBOOKS if CHAPTER_RE.search(nb)]
    assert numbers == sorted(numbers), f"chapters out of order in _toc.yml: {numbers}"


# --- one notebook at a time -----------------------------------------------------------------------
@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_stored_executed_in_order(path):
    counts = [c.execution_count for c in _code_cells(_read(path))]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path}: execution counts {counts}; run `make execute NB={path}` (top to bottom, fresh kernel)"
    )


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_no_errors_or_warnings_in_outputs(path):
    problems = []
    for i, cell in enumerate(_code_cells(_read(path)), start=1):
        allowed = "raises-exception" in _tags(cell)
        for out in cell.outputs:
            if out.output_type == "error" and not allowed:
                problems.append(f"cell [{i}]: error {out.ename}: {out.evalue}")
            if out.output_type == "stream" and out.name == "stderr" and not allowed:
                problems.append(f"cell [{i}]: stderr output {out.text[:120]!r}")
            text = _text_of(out)
            if WARNING_RE.search(text) and not allowed:
                problems.append(f"cell [{i}]: a warning in the output {text[:120]!r}")
        if allowed and not any(o.output_type == "error" for o in cell.outputs):
            problems.append(f"cell [{i}]: tagged raises-exception but raises nothing")
    assert not problems, f"{path}:\n  " + "\n  ".join(problems)


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_outputs_are_portable_and_short(path):
    problems = []
    for i, cell in enumerate(_code_cells(_read(path)), start=1):
        for out in cell.outputs:
            text = _text_of(out)
            if m := PATH_RE.search(text):
                problems.append(f"cell [{i}]: a machine path in the output: ...{m.group(0)}...")
            if m := ADDRESS_RE.search(text):
                problems.append(f"cell [{i}]: a memory address in the output: {m.group(0)}")
            if "image/svg+xml" in out.get("data", {}):
                problems.append(f"cell [{i}]: SVG output (random ids break nbval; use PNG)")
            lines = text.count("\n") + 1 if text else 0
            if lines > MAX_OUTPUT_LINES:
                problems.append(f"cell [{i}]: {lines} output lines (at most {MAX_OUTPUT_LINES})")
    assert not problems, f"{path}:\n  " + "\n  ".join(problems)


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_metadata_is_clean(path):
    nb = _read(path)
    extra = set(nb.metadata) - NOTEBOOK_METADATA
    assert not extra, f"{path}: notebook metadata {sorted(extra)}; keep {sorted(NOTEBOOK_METADATA)}"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path}: kernelspec"
    timed = [i for i, c in enumerate(nb.cells) if "execution" in c.metadata]
    assert not timed, f"{path}: timing metadata in cells {timed} (make execute strips it)"


def _setup_cell_problems(source: str) -> list[str]:
    """What is wrong with a first code cell, judged on its syntax tree (any formatting passes)."""
    tree = ast.parse(source)
    problems = []
    colab = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and "'google.colab' in sys.modules" in ast.unparse(node.test)
    ]
    if len(colab) != 1:
        problems.append('no top-level `if "google.colab" in sys.modules:` block')
    else:
        inside = ast.Module(body=colab[0].body, type_ignores=[])
        urls = [
            n.value.removeprefix("bnbook @ git+")
            for n in ast.walk(inside)
            if isinstance(n, ast.Constant) and str(n.value).startswith("bnbook @ git+")
        ]
        if urls != [REPO_URL]:
            problems.append(f"the Colab block installs {urls}, not bnbook @ git+{REPO_URL}")
        if "subprocess.run" not in ast.unparse(inside) or "pip" not in ast.unparse(inside):
            problems.append("the Colab block does not pip install with subprocess.run")
    top = [ast.unparse(n) for n in tree.body]
    if "import bnbook" not in top:
        problems.append("no top-level `import bnbook` (outside the Colab block)")
    if not any(re.fullmatch(r"bnbook\.setup_notebook\(seed=\d+\)", t) for t in top):
        problems.append("no top-level `bnbook.setup_notebook(seed=...)`")
    return problems


def test_setup_cell_check_can_fail():
    assert _setup_cell_problems(SETUP_CELL_EXAMPLE) == []
    assert _setup_cell_problems(SETUP_CELL_EXAMPLE.replace(REPO_URL, "https://example.org/x"))
    assert _setup_cell_problems(SETUP_CELL_EXAMPLE.replace("bnbook.setup_notebook(seed=0)", ""))
    unguarded = "import subprocess\nimport bnbook\n\nbnbook.setup_notebook(seed=0)"
    assert _setup_cell_problems(unguarded)


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_first_code_cell_is_the_setup_cell(path):
    cells = _code_cells(_read(path))
    assert cells, f"{path}: no code cell"
    problems = _setup_cell_problems(cells[0].source)
    assert not problems, (
        f"{path}: the first code cell must be the setup cell of CONTRIBUTING.md, installing from "
        f"repository.url in _config.yml:\n  "
        + "\n  ".join(problems)
        + f"\nFor example:\n{SETUP_CELL_EXAMPLE}"
    )
    assert "hide-cell" in _tags(cells[0]), f"{path}: the setup cell must be tagged hide-cell"


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_every_figure_has_caption_and_alt_text(path):
    problems = []
    for i, cell in enumerate(_code_cells(_read(path)), start=1):
        images = [
            o
            for o in cell.outputs
            if any(t in o.get("data", {}) for t in IMAGE_TYPES)
            and "scrapbook" not in o.get("metadata", {})  # a glued figure: captioned where pasted
        ]
        if not images:
            continue
        meta = cell.metadata.get("mystnb", {})
        caption = str(meta.get("figure", {}).get("caption", "")).strip()
        name = str(meta.get("figure", {}).get("name", ""))
        alt = str(meta.get("image", {}).get("alt", "")).strip()
        if len(images) > 1:
            problems.append(f"cell [{i}]: {len(images)} images; one figure per cell")
        if len(caption) < 20:
            problems.append(f"cell [{i}]: figure without a caption that says what to see")
        if not re.fullmatch(r"fig-[a-z0-9-]+", name):
            problems.append(f"cell [{i}]: figure name {name!r} (expected fig-<chapter>-<what>)")
        if len(alt) < 20 or alt == caption:
            problems.append(f"cell [{i}]: figure without alt text (different from the caption)")
    assert not problems, f"{path}:\n  " + "\n  ".join(problems)


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_every_widget_has_its_static_figure_before_it(path):
    problems = []
    cells = _code_cells(_read(path))
    for i, cell in enumerate(cells):
        if not any(WIDGET_VIEW in o.get("data", {}) for o in cell.outputs):
            continue
        if "nbval-ignore-output" not in cell.metadata.get("tags", []):
            problems.append(f"cell [{i + 1}]: a widget cell must carry the tag nbval-ignore-output")
        before = cells[i - 1] if i else None
        has_figure = before is not None and any(
            any(t in o.get("data", {}) for t in IMAGE_TYPES) for o in before.outputs
        )
        if not (has_figure and before.metadata.get("mystnb", {}).get("figure")):
            problems.append(
                f"cell [{i + 1}]: a widget without a captioned static figure of its default "
                "state in the code cell right before it (bnbook.widgets.show_default)"
            )
    assert not problems, f"{path}:\n  " + "\n  ".join(problems)


# --- structure of every page ----------------------------------------------------------------------
def _markdown_of(path: str) -> str:
    if path.endswith(".ipynb"):
        return "\n\n".join(c.source for c in _read(path).cells if c.cell_type == "markdown")
    return (ROOT / path).read_text()


def _headings(markdown: str) -> list[int]:
    levels, fence = [], None
    for line in markdown.splitlines():
        if m := re.match(r"^\s*(`{3,}|~{3,}|:{3,})", line):
            marker = m.group(1)
            if fence is None:
                fence = marker
            elif marker.startswith(fence[0]) and len(marker) >= len(fence):
                fence = None
            continue
        if fence is None and (m := re.match(r"^(#{1,6})\s+\S", line)):
            levels.append(len(m.group(1)))
    return levels


@pytest.mark.parametrize("path", ["intro.md", *TOC_PAGES, *TOC_NOTEBOOKS])
def test_headings_in_order(path):
    levels = _headings(_markdown_of(path))
    assert levels and levels[0] == 1, f"{path}: the page must open with one # title ({levels})"
    assert levels.count(1) == 1, f"{path}: more than one # title ({levels})"
    jumps = [(a, b) for a, b in zip(levels, levels[1:], strict=False) if b > a + 1]
    assert not jumps, f"{path}: heading levels skip ({jumps}); go # -> ## -> ###"


@needs_notebooks
@pytest.mark.parametrize("path", [nb for nb in TOC_NOTEBOOKS if CHAPTER_RE.search(nb)])
def test_chapter_shape(path):
    nb = _read(path)
    first = next(c for c in nb.cells if c.cell_type == "markdown").source
    slug = Path(path).stem.split("_", 1)[1].replace("_", "-")
    assert re.match(r"^\(ch-[a-z0-9-]+\)=\s*\n# ", first), (
        f"{path}: open with (ch-{slug})= and # title"
    )
    markdown = _markdown_of(path)
    exercises = re.findall(r"```\{exercise\}[^\n]*\n:label: (\S+)", markdown)
    assert len(exercises) >= 4, f"{path}: {len(exercises)} exercises (4-6 per chapter)"
    for label in exercises:
        solution = re.search(
            r"```\{solution\} " + re.escape(label) + r"\s*\n(:[^\n]*\n)*", markdown
        )
        assert solution, f"{path}: exercise {label} has no solution"
        assert ":class: dropdown" in solution.group(0), f"{path}: solution of {label} not hidden"
    for heading in ("## Summary", "## Exercises"):
        assert re.search("^" + heading + r"\s*$", markdown, re.M), f"{path}: no '{heading}'"


# --- one repository everywhere --------------------------------------------------------------------
def test_repository_url_is_used_everywhere():
    readme = (ROOT / "README.md").read_text()
    org_repo = REPO_URL.removeprefix("https://github.com/")
    binder_links = re.findall(r"https://mybinder\.org/v2/gh/([^/\s)]+/[^/\s)]+)/", readme)
    assert binder_links, "README.md has no Binder badge/link"
    assert set(binder_links) == {org_repo}, f"README Binder links {binder_links} != {org_repo}"
    assert CONFIG["launch_buttons"]["binderhub_url"] and CONFIG["launch_buttons"]["colab_url"]
    assert CONFIG["html"]["use_repository_button"] is True


def test_binder_environment_files():
    runtime = (ROOT / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.11", runtime), f"runtime.txt: {runtime!r}"
    reqs = (ROOT / "requirements.txt").read_text().splitlines()
    pins = [r for r in reqs if r.strip() and not r.startswith("#")]
    assert "-e ." in pins, "requirements.txt must install the book's package (-e .)"
    loose = [r for r in pins if r != "-e ." and "==" not in r]
    assert not loose, f"requirements.txt must pin exact versions: {loose}"
    for name in ("jupyter-book==1.0.4.post1", "nbval", "nbconvert", "sphinx-exercise", "torch=="):
        assert any(p.lower().startswith(name.lower()) for p in pins), f"requirements.txt: {name}"


def test_widget_state_is_valid_json_when_present():
    for path in TOC_NOTEBOOKS:
        widgets = _read(path).metadata.get("widgets")
        if widgets:
            state = widgets.get("application/vnd.jupyter.widget-state+json", {})
            json.dumps(state)  # serialisable
            assert "state" in state, f"{path}: widget metadata without saved state"


# --- one base seed --------------------------------------------------------------------------------
# Every draw of a chapter comes from bnbook.seed(k) / bnbook.seeds(n), so that BNBOOK_SEED moves
# all of them at once (make test-robust runs the book under other base seeds).
LITERAL_SEED_RE = re.compile(
    r"(manual_seed|default_rng|np\.random\.seed|random\.seed|set_random_seed|seed_everything)"
    r"\(\s*\d"
    r"|\bseeds?\s*=\s*(\[\s*\d|range\(|\d)"
    r"|\bSEEDS\s*=\s*(\[|range\(|\d)"
)


SETUP_RE = re.compile(r"setup_notebook\(seed=\d+\)")  # its argument already means bnbook.seed(k)


def _literal_seeds(source: str) -> list[str]:
    lines = source.splitlines()
    return [ln.strip() for ln in lines if LITERAL_SEED_RE.search(SETUP_RE.sub("", ln))]


def test_literal_seed_check_can_fail():
    assert _literal_seeds("torch.manual_seed(0)\nrng = np.random.default_rng(12)")
    assert _literal_seeds("train_stacked(net, seeds=[0, 1, 2])")
    assert _literal_seeds("h = train(net, seeds=range(3))")
    assert _literal_seeds("SEEDS = [0, 1, 2]")
    assert not _literal_seeds("torch.manual_seed(bnbook.seed(0))\nseeds=bnbook.seeds(5)")
    assert not _literal_seeds("bnbook.setup_notebook(seed=0)")


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_no_literal_seeds(path):
    nb = _read(path)
    found = [s for cell in _code_cells(nb) for s in _literal_seeds(cell.source)]
    assert not found, f"{path}: seeds must come from bnbook.seed/seeds: {found}"


# --- what a reader's runtime and the HTML page need -----------------------------------------------
CODE_COLUMN = 88  # characters of code the HTML book's code column shows without cutting


def _code_lines(path: str) -> list[str]:
    return [line for cell in _code_cells(_read(path)) for line in cell.source.splitlines()]


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_code_fits_the_html_code_column(path):
    long = [line for line in _code_lines(path) if len(line) > CODE_COLUMN]
    assert not long, f"{path}: code lines wider than {CODE_COLUMN} characters: {long[:3]}"


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_no_test_or_formatter_markers_in_code(path):
    """Readers see the code: nbval's and the formatter's instructions go in tags, not comments."""
    found = [line for line in _code_lines(path) if re.search(r"#\s*(NBVAL_|fmt:)", line)]
    assert not found, f"{path}: tool markers in code (use cell tags): {found[:3]}"


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_no_build_tool_imported_by_a_chapter(path):
    """Colab and Binder have no myst-nb: chapters glue through bnbook.evidence, which can do without."""
    found = [line for line in _code_lines(path) if re.match(r"\s*(from|import)\s+myst_nb\b", line)]
    assert not found, f"{path}: import myst_nb directly: {found}"


# --- cells a reader can take in at a glance --------------------------------------------------------
CELL_LINES = 20  # code lines (blank lines not counted) of one code cell; CONTRIBUTING asks ~15
# Cells that read better whole, by notebook and cell id, each with its reason. Keep it short.
_FIGURE = "one figure's drawing code, hidden on the page: split, it would read worse"
LONG_CELLS: dict[tuple[str, str], str] = {
    ("chapters/01_why.ipynb", "537343c5"): _FIGURE,
    ("chapters/01_why.ipynb", "0a37827f"): "the one function the histogram widget redraws",
    ("chapters/03_neuron.ipynb", "17d8ed0f"): _FIGURE,
    ("chapters/04_backprop.ipynb", "fd58775d"): _FIGURE,
    ("chapters/05_inference.ipynb", "cell-032"): "the one function the momentum widget redraws",
    ("chapters/07_benefits.ipynb", "4a049e55"): _FIGURE,
    ("chapters/13_beyond.ipynb", "8d024db9"): _FIGURE,
}


def _cell_length(source: str) -> int:
    """Non-blank lines, not counting imports: a cell's imports are a list, read at a glance."""
    lines = sum(1 for line in source.splitlines() if line.strip())
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython syntax (magics): count every line
        return lines
    imports = (ast.Import, ast.ImportFrom)
    return lines - sum(n.end_lineno - n.lineno + 1 for n in tree.body if isinstance(n, imports))


def test_cell_length_check_can_fail():
    assert _cell_length("a = 1\n\n\nb = 2\n") == 2
    assert _cell_length("import y\nfrom x import (\n    a,\n    b,\n)\nc = a(\n    b,\n)\n") == 3
    assert _cell_length("\n".join(f"x{i} = {i}" for i in range(CELL_LINES + 1))) > CELL_LINES


@needs_notebooks
@pytest.mark.parametrize("path", TOC_NOTEBOOKS)
def test_code_cells_are_short(path):
    long = {
        cell.get("id"): _cell_length(cell.source)
        for cell in _code_cells(_read(path))
        if _cell_length(cell.source) > CELL_LINES and (path, cell.get("id")) not in LONG_CELLS
    }
    assert not long, (
        f"{path}: code cells over {CELL_LINES} lines (cell id: lines): {long}; move repeated "
        "code into the package, split the cell, or list it in LONG_CELLS with a reason"
    )


def test_long_cell_allow_list_is_short_and_current():
    assert len(LONG_CELLS) <= 10
    for (path, cell_id), reason in LONG_CELLS.items():
        ids = {cell.get("id") for cell in _code_cells(_read(path))}
        assert cell_id in ids and reason, (path, cell_id)
