"""The feature dashboard: one self-contained HTML file from a ``features.json`` statistics dict.

The page (the template ``dashboard.html`` next to this module: HTML, CSS and vanilla JavaScript) needs no
network: the statistics are embedded as JSON in a ``<script type="application/json">`` block and drawn by
the page's own script: a feature list sortable by id, density, max and mean, filterable by id, shown a page
at a time; and per feature its statistics, histogram (SVG), logit effects and top examples, tokens shaded by
activation. Only the selected feature's examples are in the DOM, so 10k features load quickly.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_write

FORMAT_PREFIX = "pyinterp.features/"
_PLACEHOLDER = "__PYINTERP_STATS__"


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data: numpy scalars and arrays to Python numbers and lists, floats rounded to 6
    significant digits (the page shows 4; a third of the file's size), NaN and inf to None (``JSON.parse``
    accepts neither)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def _check(stats: Any) -> None:
    """An InputError unless ``stats`` looks like a features.json dict (format, a list of features with ids)."""
    if not isinstance(stats, dict):
        raise InputError(f"feature statistics must be a dict (a features.json), not {type(stats).__name__}")
    fmt = stats.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        raise InputError(f"not pyinterp feature statistics: format is {fmt!r}, expected '{FORMAT_PREFIX}1'")
    features = stats.get("features")
    if not isinstance(features, list):
        raise InputError("feature statistics have no 'features' list")
    for i, f in enumerate(features):
        if not isinstance(f, dict) or not isinstance(f.get("id"), int) or isinstance(f.get("id"), bool):
            raise InputError(f"feature statistics: entry {i} of 'features' has no integer 'id'")


def embed_json(stats: dict) -> str:
    """``stats`` as JSON safe inside a ``<script>`` element: every ``<`` written as ``\\u003c`` (so no token can
    close the script or open a comment), non-ASCII escaped (lone surrogates from broken byte tokens survive)."""
    text = json.dumps(_plain(stats), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_dashboard(stats: dict) -> str:
    """The dashboard page of ``stats`` (the features.json schema, format ``pyinterp.features/1``) as HTML."""
    _check(stats)
    template = resources.files("pyinterp.viz").joinpath("dashboard.html").read_text(encoding="utf-8")
    before, placeholder, after = template.partition(_PLACEHOLDER)
    assert placeholder, "dashboard.html has lost its data placeholder"
    return before + embed_json(stats) + after


def write_dashboard(stats: dict, path: str | os.PathLike) -> None:
    """Write the dashboard of ``stats`` (a features.json dict) to ``path``, one self-contained HTML file,
    written whole or not at all."""
    html = render_dashboard(stats)
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write the dashboard to {path}: {path.parent} is not a directory")
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(html)
