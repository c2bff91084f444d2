"""Small Sphinx additions for the bnbook build.

Build tooling, kept outside the package: `_config.yml` loads this file as a local extension.

Duplicate inline scripts: with Sphinx 7.4, an inline script that an extension adds with
``app.add_js_file(None, body=...)`` after the builder is initialised (sphinx-thebe and
sphinx-togglebutton do) is emitted twice on every page, once as ``None`` and once as ``''``.
sphinx-thebe's copy declares ``const THEBE_JS_URL``, so the second copy throws
"Identifier 'THEBE_JS_URL' has already been declared" in every reader's browser console.
This extension drops the exact duplicates before the page is written.

Numbering of unnumbered pages: figures, equations and exercises are numbered per chapter
("Figure 3.2") in the numbered parts. On pages outside them (the landing page, "A first look",
the appendices) Sphinx would count on across pages, so the first-look chapter's first equation
could be (2) because the landing page has one. Here each such page counts from 1.

Figures glued from another page: myst-nb's ``glue:figure`` only pastes from the same notebook,
and its cross-page ``glue:any`` gives neither caption nor alt text. The ``glued-figure``
directive pastes a figure glued in any notebook as a numbered figure with a caption and alt text::

    ```{glued-figure} first-look-fig-before-after
    :doc: chapters/00_first_look.ipynb
    :name: fig-landing-before-after
    :alt: What a screen reader should say.

    The caption: what to see.
    ```
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util.docutils import SphinxDirective


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for script in scripts:
        key = (
            getattr(script, "filename", script) or "",
            getattr(script, "priority", None),
            tuple(sorted(getattr(script, "attributes", {}).items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def _number_unnumbered_pages_from_one(app, env) -> list[str]:
    changed = []
    for docname, by_type in env.toc_fignumbers.items():
        if env.toc_secnumbers.get(docname):
            continue  # a numbered chapter: Sphinx's "chapter.k" numbers are right
        for figtype, numbers in by_type.items():
            ordered = sorted(numbers, key=lambda target: numbers[target])
            renumbered = {target: (k,) for k, target in enumerate(ordered, start=1)}
            if renumbered != numbers:
                by_type[figtype] = renumbered
                changed.append(docname)
    return sorted(set(changed))


class GluedFigure(SphinxDirective):
    """A numbered figure whose image is a glued output of another notebook."""

    required_arguments = 1  # the glue key
    has_content = True
    option_spec = {
        "doc": directives.unchanged_required,
        "name": directives.unchanged_required,
        "alt": directives.unchanged_required,
    }

    def run(self) -> list[nodes.Node]:
        from myst_nb.ext.glue.utils import PendingGlueReferenceError, create_pending_glue_ref

        missing = [k for k in ("doc", "name", "alt") if not self.options.get(k)]
        if missing or not self.content:
            raise self.error(f"glued-figure needs :doc:, :name:, :alt: and a caption ({missing})")
        try:
            ref = create_pending_glue_ref(
                self.state.document,
                self.env.docname,
                self.lineno,
                self.options["doc"],
                self.arguments[0],
                gtype="any",
            )
        except PendingGlueReferenceError as exc:
            raise self.error(str(exc)) from exc
        figure = nodes.figure("", ref)
        figure["bnbook_alt"] = self.options["alt"]
        self.set_source_info(figure)
        self.options["name"] = self.options["name"]
        self.add_name(figure)
        holder = nodes.Element()
        self.state.nested_parse(self.content, self.content_offset, holder)
        first = holder[0]
        if not isinstance(first, nodes.paragraph):
            raise self.error("the caption of a glued-figure must be a paragraph")
        figure += nodes.caption(first.rawsource, "", *first.children)
        return [figure]


class SetGluedFigureAlt(SphinxPostTransform):
    """After myst-nb pastes the image (its post-transform, priority 5), give it the alt text."""

    default_priority = 6

    def run(self, **kwargs: Any) -> None:
        for figure in self.document.findall(nodes.figure):
            alt = figure.get("bnbook_alt")
            if alt:
                for image in figure.findall(nodes.image):
                    image["alt"] = alt


def setup(app):
    app.add_directive("glued-figure", GluedFigure)
    app.add_post_transform(SetGluedFigureAlt)
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    # after Sphinx's own toctree collector (priority 500) has assigned the numbers
    app.connect("env-get-updated", _number_unnumbered_pages_from_one, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
