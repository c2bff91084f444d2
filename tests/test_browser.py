"""The HTML book as a reader sees it: every page of ``_build/html`` opened in headless Chromium.

Checks, per page: no console error and no failed or off-machine request; math typeset by the local
MathJax (a MathJax container in every math element, no raw TeX left in the text); every image
loaded; the launch buttons point at the configured repository and the page's own notebook; every
widget rendered by the local widget manager, with the static figure of its default state right
before it. Outside CI, a full-page screenshot of each page goes to ``_build/screenshots/`` for a
person to look at. Links and anchors are checked statically over every page.

Needs Debian's ``/usr/bin/chromium`` (``.ci/run`` installs it) and a built book (``make book``;
``make test`` builds it first, so there this test always runs).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SKIP_DIRS = {"_static", "_sources", "_images", "_sphinx_design_static"}
# index.html is jupyter-book's redirect to the root page; it is checked on its own below.
PAGES = (
    sorted(
        p.relative_to(HTML).as_posix()
        for p in HTML.rglob("*.html")
        if not SKIP_DIRS.intersection(p.relative_to(HTML).parts) and p.name != "index.html"
    )
    if HTML.is_dir()
    else []
)

pytestmark = pytest.mark.skipif(
    not (HTML / "index.html").is_file(),
    reason="_build/html is absent: run `make book` first (`make test` builds it before this test)",
)

# Console messages that are known, harmless and explicitly allowed (everything else fails):
#  - sphinx-book-theme on a fresh browser profile (no saved theme in localStorage);
#  - the browser asking for /favicon.ico, which the book does not ship.
ALLOWED_CONSOLE = [
    (re.compile(r"^Got invalid theme mode: \. Resetting to auto\.$"), None),
    (re.compile(r"^Failed to load resource: .*404"), re.compile(r"/favicon\.ico$")),
]

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def _repo_parts() -> tuple[str, str, str]:
    url = CONFIG["repository"]["url"].rstrip("/")
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+)", url)
    assert match, f"repository.url in _config.yml is not a GitHub repository URL: {url}"
    return match.group(1), match.group(2), CONFIG["repository"].get("branch", "main")


# --- a local server and a browser, shared by the whole module -----------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output readable
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


# --- what runs inside the page ------------------------------------------------------------------
RAW_TEX_JS = r"""
() => {
  const skip = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "TEXTAREA", "MJX-CONTAINER", "MJX-ASSISTIVE-MML"]);
  const found = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let el = node.parentElement; el; el = el.parentElement) {
        if (skip.has(el.tagName) || el.classList.contains("highlight") || el.classList.contains("output")) {
          return NodeFilter.FILTER_REJECT;
        }
      }
      return NodeFilter.FILTER_ACCEPT;
    },
  });
  const raw = /\$\$|\\begin\{|\\\[|\\\(|\\end\{/;
  while (walker.nextNode()) {
    const text = walker.currentNode.textContent;
    if (raw.test(text)) found.push(text.trim().slice(0, 120));
  }
  return found;
}
"""

MATH_JS = """
async () => {
  const maths = Array.from(document.querySelectorAll(".math"));
  if (maths.length === 0) return {count: 0};
  await window.MathJax.startup.promise;
  const script = document.querySelector('script[src*="tex-chtml"]');
  return {
    count: maths.length,
    untypeset: maths.filter(m => !m.querySelector("mjx-container")).map(m => m.textContent.slice(0, 80)),
    errors: Array.from(document.querySelectorAll("mjx-merror, [data-mjx-error]"))
      .map(e => e.getAttribute("data-mjx-error") || e.textContent),
    src: script ? script.src : null,
  };
}
"""

IMAGES_JS = """
async () => {
  const imgs = Array.from(document.images);
  for (const img of imgs) img.loading = "eager";
  await Promise.all(imgs.map(img => img.decode().catch(() => null)));
  return imgs.filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.src);
}
"""

WIDGETS_JS = """
() => {
  const views = Array.from(document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]'));
  return views.map(view => {
    const cell = view.closest(".cell");
    let previous = cell ? cell.previousElementSibling : null;
    while (previous && !previous.classList.contains("cell")) previous = previous.previousElementSibling;
    const figure = previous ? previous.querySelector("figure img") : null;
    const area = view.previousElementSibling;
    return {
      rendered: !!(area && area.classList.contains("widget-subarea") && area.children.length > 0),
      staticFigure: !!(figure && figure.complete && figure.naturalWidth > 0),
      figureId: figure ? (figure.closest("figure").id || "") : "",
    };
  });
}
"""


# Code inputs whose box scrolls sideways (lines cut off at the right edge): the longest line of each.
SCROLLED_CODE_JS = """
() => Array.from(document.querySelectorAll("div.cell_input pre"))
  .filter(pre => pre.scrollWidth > pre.clientWidth + 1)
  .map(pre => pre.textContent.split("\\n").reduce((a, b) => (b.length > a.length ? b : a), ""))
"""
# Laptop widths at which the page shows both sidebars: the narrowest leaves the code column least room.
CODE_VIEWPORTS = (1200, 1280, 1366)


def _allowed(message_text: str, url: str) -> bool:
    for text_re, url_re in ALLOWED_CONSOLE:
        if text_re.search(message_text) and (url_re is None or url_re.search(url or "")):
            return True
    return False


@pytest.mark.parametrize("page_path", PAGES)
def test_page(page_path, server, browser):
    problems: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)

    def on_console(msg):
        if msg.type in ("error", "warning") and not _allowed(msg.text, msg.location.get("url", "")):
            if msg.type == "error":
                problems.append(f"console error: {msg.text} ({msg.location.get('url', '')})")

    def on_request(request):
        url = request.url
        if not (url.startswith(server) or url.startswith(("data:", "blob:", "about:"))):
            problems.append(f"request off this machine: {url}")

    def on_response(response):
        if response.status >= 400 and not response.url.endswith("/favicon.ico"):
            problems.append(f"HTTP {response.status}: {response.url}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(f"uncaught exception: {exc}"))
    page.on("request", on_request)
    page.on("response", on_response)
    page.goto(f"{server}/{page_path}", wait_until="load")
    page.wait_for_load_state("networkidle")

    # Math: typeset by the local MathJax, no TeX errors, no raw TeX left in the text.
    math = page.evaluate(MATH_JS)
    if math["count"]:
        assert math["src"] and math["src"].startswith(server), f"MathJax not local: {math['src']}"
        problems += [f"math not typeset: {t!r}" for t in math["untypeset"]]
        problems += [f"TeX error: {t!r}" for t in math["errors"]]
    problems += [f"raw TeX in the page: {t!r}" for t in page.evaluate(RAW_TEX_JS)]

    # Images: every one loaded.
    problems += [f"image not loaded: {src}" for src in page.evaluate(IMAGES_JS)]

    # Widgets: rendered from the saved state, each with its static figure right before it.
    if page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count():
        try:
            page.wait_for_function(
                """() => Array.from(document.querySelectorAll(
                     'script[type="application/vnd.jupyter.widget-view+json"]'))
                   .every(v => v.previousElementSibling
                               && v.previousElementSibling.classList.contains("widget-subarea")
                               && v.previousElementSibling.children.length > 0)""",
                timeout=30_000,
            )
        except Exception:  # reported below, with the other problems
            pass
        for i, widget in enumerate(page.evaluate(WIDGETS_JS)):
            if not widget["rendered"]:
                problems.append(f"widget {i} was not rendered by the local widget manager")
            if not widget["staticFigure"]:
                problems.append(f"widget {i} has no static figure (with a loaded image) before it")

    # Launch buttons and the repository button.
    org, repo, branch = _repo_parts()
    repo_url = CONFIG["repository"]["url"].rstrip("/")
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    if not any(h.rstrip("/") == repo_url for h in hrefs):
        problems.append(f"no repository button linking to {repo_url}")
    notebook = Path(page_path).with_suffix(".ipynb")
    if (ROOT / notebook).is_file():
        path = notebook.as_posix()
        binder = f"{CONFIG['launch_buttons']['binderhub_url']}/v2/gh/{org}/{repo}/{branch}"
        expected = {
            "Binder": f"{binder}?urlpath=lab/tree/{path}",
            "Colab": f"{CONFIG['launch_buttons']['colab_url']}/github/{org}/{repo}/blob/{branch}/{path}",
        }
        for name, url in expected.items():
            if url not in hrefs:
                problems.append(f"{name} launch button missing or wrong; expected {url}")

    if not os.environ.get("CI"):  # for a person to look at; in CI nobody does
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / (page_path.replace("/", "__").removesuffix(".html") + ".png")
        page.screenshot(path=str(shot), full_page=True)

    # Code: every line of every code cell visible without scrolling, at common laptop widths.
    for width in CODE_VIEWPORTS:
        page.set_viewport_size({"width": width, "height": 900})
        problems += [
            f"code line cut off at {width} px: {t!r}" for t in page.evaluate(SCROLLED_CODE_JS)
        ]
    context.close()
    assert not problems, f"{page_path}:\n  " + "\n  ".join(problems)


def test_index_redirects_to_root_page():
    root = yaml.safe_load((ROOT / "_toc.yml").read_text())["root"]
    text = (HTML / "index.html").read_text()
    assert f'url={root}.html"' in text or f"url={root}.html'" in text, text[:500]


# --- links and anchors, checked over the files themselves ---------------------------------------
class _LinkParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("img", "script") and attrs.get("src"):
            self.links.append(attrs["src"])
        if tag == "link" and attrs.get("href") and attrs.get("rel") != "canonical":
            self.links.append(attrs["href"])


@functools.cache
def _parse(path: Path) -> _LinkParser:
    parser = _LinkParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_internal_links_and_anchors_resolve():
    broken = []
    pages = [HTML / p for p in PAGES] + [HTML / "index.html"]
    for page in pages:
        for href in _parse(page).links:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith(("mailto:", "javascript:")):
                continue
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(HTML)}: {href} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                if unquote(parts.fragment) not in _parse(target).ids:
                    broken.append(f"{page.relative_to(HTML)}: {href} (no such anchor)")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)
