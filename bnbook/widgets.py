"""Interactive figures that still say something on a static page.

A chapter that offers a slider pairs it with a static figure of the slider's default state, drawn
by the same function, in the cell right before it: the HTML book and a PDF show the figure, a
reader with a kernel (Binder, Colab, Jupyter) moves the slider. Two cells, one drawing function::

    def draw(gamma=1.0, beta=0.0):              # draws one matplotlib figure, returns nothing
        ...

    controls = {"gamma": slider(1.0, 0.1, 3.0, 0.1, "γ"), "beta": slider(0.0, -2.0, 2.0, 0.1, "β")}

    # cell 1 (figure metadata: caption + alt text, see CONTRIBUTING.md)
    show_default(draw, controls)

    # cell 2 (tag `nbval-ignore-output`: widget output is not compared by nbval)
    panel = interactive_figure(draw, controls)

``tests/test_book.py`` checks that every widget output has such a figure right before it, and the
browser test checks that the published page shows both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["slider", "defaults", "show_default", "interactive_figure"]


def slider(
    value: float,
    min: float,
    max: float,
    step: float,
    description: str | None = None,
    *,
    integer: bool = False,
    readout_format: str | None = None,
):
    """A slider that redraws on release (not while dragging), so a slow figure stays usable.

    Parameters
    ----------
    value, min, max, step : float
        Default value, range and step. ``value`` is the state the static figure shows.
    description : str, optional
        The label in front of the slider (plain text or inline ``$...$`` math).
    integer : bool
        An ``IntSlider`` instead of a ``FloatSlider``.
    readout_format : str, optional
        Format of the number shown beside the slider (e.g. ``".2f"``, ``".0e"``).

    Returns
    -------
    ipywidgets.FloatSlider or ipywidgets.IntSlider

    Raises
    ------
    ValueError
        If ``value`` is outside ``[min, max]`` or ``step`` is not positive.

    Examples
    --------
    >>> s = slider(1.0, 0.1, 3.0, 0.1, "gamma")
    >>> s.value, s.min, s.max, s.continuous_update
    (1.0, 0.1, 3.0, False)
    """
    import ipywidgets

    if not min <= value <= max:
        raise ValueError(f"slider value must lie in [min, max] = [{min}, {max}], got {value}")
    if step <= 0:
        raise ValueError(f"slider step must be positive, got {step}")
    kwargs: dict[str, Any] = dict(
        value=value,
        min=min,
        max=max,
        step=step,
        description=description or "",
        continuous_update=False,
        style={"description_width": "initial"},
    )
    if readout_format is not None:
        kwargs["readout_format"] = readout_format
    cls = ipywidgets.IntSlider if integer else ipywidgets.FloatSlider
    return cls(**kwargs)


def defaults(controls: Mapping[str, Any]) -> dict[str, Any]:
    """The default keyword arguments of ``controls``: each widget's value, or the value itself.

    Parameters
    ----------
    controls : mapping of str to an ipywidgets value widget, ``ipywidgets.fixed`` or a plain value

    Returns
    -------
    dict
        ``{name: value}``, ready for ``draw(**defaults(controls))``.

    Examples
    --------
    >>> defaults({"gamma": slider(1.5, 0.0, 3.0, 0.5), "label": "fixed text"})
    {'gamma': 1.5, 'label': 'fixed text'}
    """
    values = {}
    for name, control in controls.items():
        values[name] = getattr(control, "value", control)
    return values


def show_default(draw: Callable[..., Any], controls: Mapping[str, Any]) -> Any:
    """Draw the figure of the controls' default state and show it (the static twin of a widget).

    Parameters
    ----------
    draw : callable
        ``draw(**kwargs)`` draws one matplotlib figure (it creates it, e.g. with ``plt.subplots``).
    controls : mapping
        The same mapping that is passed to :func:`interactive_figure`.

    Returns
    -------
    Any
        Whatever ``draw`` returns (e.g. numbers the chapter asserts on).
    """
    import matplotlib.pyplot as plt

    result = draw(**defaults(controls))
    plt.show()
    return result


def interactive_figure(draw: Callable[..., Any], controls: Mapping[str, Any]):
    """Display ``draw`` with a widget per control; it redraws when a control changes.

    Strings and numbers in ``controls`` are passed through unchanged (``ipywidgets.fixed``).
    Without a kernel (the HTML book) the widget shows its saved default state and does not react;
    the static figure drawn by :func:`show_default` in the previous cell is what the page relies on.

    Parameters
    ----------
    draw : callable
        ``draw(**kwargs)`` draws one matplotlib figure.
    controls : mapping
        Name to ipywidgets widget (e.g. from :func:`slider`), ``ipywidgets.fixed`` or plain value.

    Returns
    -------
    ipywidgets.interactive
        The displayed widget (assign it: ``panel = interactive_figure(...)``);
        ``panel.kwargs`` holds the current values, ``panel.result`` what ``draw`` last returned.
    """
    import ipywidgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    def _draw_and_show(**kwargs):
        result = draw(**kwargs)
        plt.show()
        return result

    widgets = {
        name: control if isinstance(control, ipywidgets.Widget) else ipywidgets.fixed(control)
        for name, control in controls.items()
    }
    panel = ipywidgets.interactive(_draw_and_show, **widgets)
    display(panel)
    return panel
