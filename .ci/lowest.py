"""Print the lowest versions that pyproject.toml's dependency ranges admit, as pip pins.

One ``name==version`` a line, from each dependency's lower bound (``>=``, ``==`` or ``~=``), so that
a CI step can install the package the way a hosted notebook does, but at the floor of every range:

    python .ci/lowest.py > /tmp/lowest.txt
    python -m venv /tmp/lowest && /tmp/lowest/bin/pip install torch==2.13.0 pytest hypothesis
    /tmp/lowest/bin/pip install . -c /tmp/lowest.txt   # -c: the pins constrain, install nothing else

torch is left out by default (``--exclude``): any other torch than this machine's local 2.13.0
build would pull a multi-GB CUDA wheel. A dependency without a lower bound is an error (exit 1):
its lowest version would be whatever the index holds oldest, which nobody has tested.

    python .ci/lowest.py [--pyproject PATH] [--exclude NAME ...]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name, optional [extras], the specifiers, an optional ; marker
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?$")
_LOWER = re.compile(r"^(>=|==|~=)\s*([0-9][A-Za-z0-9.+!-]*)$")


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-``, ``_``, ``.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lowest_pins(dependencies: list[str], exclude: set[str]) -> list[str]:
    """``name==version`` for the lower bound of each requirement not in ``exclude``.

    >>> lowest_pins(["numpy>=2.0", "torch>=2.4", "tqdm >= 4.66, <5", "ipywidgets~=8.0"], {"torch"})
    ['numpy==2.0', 'tqdm==4.66', 'ipywidgets==8.0']
    """
    pins = []
    for requirement in dependencies:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"cannot parse the requirement {requirement!r}")
        name, _extras, specifiers, _marker = match.groups()
        if normalise(name) in exclude:
            continue
        lower = [m.group(2) for s in specifiers.split(",") if (m := _LOWER.match(s.strip()))]
        if not lower:
            raise ValueError(
                f"{requirement!r} has no lower bound (>=, == or ~=): its lowest version is undefined"
            )
        pins.append(f"{name}=={lower[0]}")
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--exclude", nargs="*", default=["torch"], help="names to leave out")
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text())["project"]
    try:
        pins = lowest_pins(project.get("dependencies", []), {normalise(n) for n in args.exclude})
    except ValueError as err:
        print(f"{args.pyproject}: {err}", file=sys.stderr)
        return 1
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
