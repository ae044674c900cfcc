"""Drift between two runs of ``pyinterp features``: has the model's use of its features changed between corpora?

Both inputs are features.json files (format ``pyinterp.features/1``) of the same source (same kind, tensor,
SAE and number of units; anything else is a one-line error). The features compared are those listed in both.

- **KL of the feature-frequency distributions**: each run's counts as a distribution over the compared
  features, ``p_i = (count_i + 1/2) / sum_j (count_j + 1/2)`` (add-1/2 smoothing, so a dead feature does not
  make the divergence infinite); ``KL(new || baseline)`` and ``KL(baseline || new)`` in nats.
- **frequency shift**: a two-proportion z-test per feature, ``z = (p_new - p_base) / sqrt(p (1 - p)
  (1/n_base + 1/n_new))`` with the pooled ``p``; two-sided p-value from the normal distribution.
- **mean shift**: Welch's t from each run's mean, std and n, ``t = (m_new - m_base) / sqrt(s_base^2/n_base +
  s_new^2/n_new)``; its two-sided p-value from the normal distribution (n is the number of tokens, thousands
  and more, where Student's t and the normal agree to three decimals).
- a feature **shifted** when its p-value is below ``alpha / n_compared`` (Bonferroni: ``alpha`` is the
  chance of any false alarm over all features) and, for frequency, its density changed by at least
  ``min_ratio`` times either way.
- **died**: > 0 in the baseline, never in the new run; **born**: the reverse (from the runs' ``dead`` lists,
  which cover every unit, listed or not).

Both tests take tokens as independent draws; tokens of one context are not, so the p-values are optimistic:
keep ``alpha`` small. Each shift is listed with its test and statistic in :meth:`Drift.to_json`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyinterp.errors import InputError

FORMAT = "pyinterp.features/1"
SMOOTHING = 0.5


def load_features(path: str | os.PathLike) -> dict:
    """A features.json file, checked for its format; a one-line error otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path} is not a pyinterp features file (format {FORMAT!r})")
    return data


def _check_same_source(base: dict, new: dict) -> None:
    for key in ("kind", "tensor", "sae"):
        if base["source"].get(key) != new["source"].get(key):
            raise InputError(f"the baseline is of another {key}: {base['source'].get(key)!r}, this run "
                             f"{new['source'].get(key)!r}")
    if base["n_units"] != new["n_units"]:
        raise InputError(f"the baseline has {base['n_units']} units, this run {new['n_units']}: another width")


def _normal_p(z: np.ndarray) -> np.ndarray:
    """Two-sided p-value of standard normal statistics ``z``."""
    return np.array([math.erfc(abs(float(v)) / math.sqrt(2)) for v in z.ravel()]).reshape(z.shape)


@dataclass
class Drift:
    """The comparison of a run with its baseline (see the module docstring); lists are feature ids."""

    n_base: int
    n_new: int
    ids: np.ndarray            # [m] the compared features
    base_density: np.ndarray   # [m]
    new_density: np.ndarray    # [m]
    kl_new_base: float
    kl_base_new: float
    died: list[int]
    born: list[int]
    frequency: list[dict] = field(default_factory=list)
    mean: list[dict] = field(default_factory=list)
    alpha: float = 0.01
    min_ratio: float = 1.5

    def to_json(self) -> dict:
        threshold = self.alpha / max(len(self.ids), 1)
        return {"format": "pyinterp.drift/1", "n_tokens": {"baseline": self.n_base, "new": self.n_new},
                "n_compared": int(len(self.ids)),
                "kl": {"new_baseline": self.kl_new_base, "baseline_new": self.kl_base_new,
                       "smoothing": f"add-{SMOOTHING} to each count"},
                "died": self.died, "born": self.born,
                "tests": {"frequency": "two-proportion z-test, two-sided", "mean": "Welch's t, normal approximation",
                          "alpha": self.alpha, "bonferroni_threshold": threshold, "min_ratio": self.min_ratio},
                "frequency_shifted": self.frequency, "mean_shifted": self.mean}


def compare(base: dict, new: dict, alpha: float = 0.01, min_ratio: float = 1.5) -> Drift:
    """Compare features.json ``new`` with ``base`` (both dicts as :func:`load_features` returns them)."""
    if not 0 < alpha < 1 or min_ratio < 1:
        raise InputError(f"need 0 < alpha < 1 and min_ratio >= 1, got {alpha} and {min_ratio}")
    _check_same_source(base, new)
    b = {f["id"]: f for f in base["features"]}
    n = {f["id"]: f for f in new["features"]}
    ids = np.array(sorted(set(b) & set(n)), np.int64)
    if ids.size == 0:
        raise InputError("the baseline and this run list no feature in common")
    nb, nn = int(base["corpus"]["n_tokens"]), int(new["corpus"]["n_tokens"])
    cb = np.array([b[i]["count"] for i in ids], np.float64)
    cn = np.array([n[i]["count"] for i in ids], np.float64)
    pb, pn = (cb + SMOOTHING) / (cb + SMOOTHING).sum(), (cn + SMOOTHING) / (cn + SMOOTHING).sum()
    kl_nb, kl_bn = float(np.sum(pn * np.log(pn / pb))), float(np.sum(pb * np.log(pb / pn)))
    threshold = alpha / len(ids)
    drift = Drift(nb, nn, ids, cb / nb, cn / nn, kl_nb, kl_bn,
                  died=sorted(set(new["dead"]) - set(base["dead"])), born=sorted(set(base["dead"]) - set(new["dead"])),
                  alpha=alpha, min_ratio=min_ratio)
    pooled = (cb + cn) / (nb + nn)
    se = np.sqrt(pooled * (1 - pooled) * (1 / nb + 1 / nn))
    z = np.divide(cn / nn - cb / nb, se, out=np.zeros_like(se), where=se > 0)
    p = _normal_p(z)
    ratio = (cn / nn + 0.5 / nn) / (cb / nb + 0.5 / nb)  # the same half-count smoothing as the KL
    for k in np.flatnonzero((p < threshold) & (np.maximum(ratio, 1 / ratio) >= min_ratio)):
        drift.frequency.append({"id": int(ids[k]), "baseline": float(cb[k] / nb), "new": float(cn[k] / nn),
                                "ratio": float(ratio[k]), "z": float(z[k]), "p": float(p[k])})
    mb, mn = np.array([b[i]["mean"] for i in ids]), np.array([n[i]["mean"] for i in ids])
    sb, sn = np.array([b[i]["std"] for i in ids]), np.array([n[i]["std"] for i in ids])
    se = np.sqrt(sb**2 / nb + sn**2 / nn)
    t = np.divide(mn - mb, se, out=np.zeros_like(se), where=se > 0)
    p = _normal_p(t)
    for k in np.flatnonzero(p < threshold):
        drift.mean.append({"id": int(ids[k]), "baseline": float(mb[k]), "new": float(mn[k]), "t": float(t[k]),
                           "p": float(p[k])})
    return drift


def table(drift: Drift, markdown: bool = False, limit: int = 20) -> str:
    """The drift as text (or a Markdown table): the summary, then the shifted features, largest |z| first."""
    lines = [f"KL(new || baseline) = {drift.kl_new_base:.4g} nats, KL(baseline || new) = {drift.kl_base_new:.4g} "
             f"over {len(drift.ids)} features ({drift.n_base} vs {drift.n_new} tokens)",
             f"died: {_ids(drift.died)}", f"born: {_ids(drift.born)}",
             f"frequency shifted (z-test, p < {drift.alpha:g}/{len(drift.ids)}, ratio >= {drift.min_ratio:g}): "
             f"{len(drift.frequency)}; mean shifted (Welch): {len(drift.mean)}"]
    rows = [(f["id"], "frequency", f"{f['baseline']:.4g}", f"{f['new']:.4g}", f"z={f['z']:+.2f}", f"{f['p']:.2g}")
            for f in sorted(drift.frequency, key=lambda f: -abs(f["z"]))[:limit]]
    rows += [(f["id"], "mean", f"{f['baseline']:.4g}", f"{f['new']:.4g}", f"t={f['t']:+.2f}", f"{f['p']:.2g}")
             for f in sorted(drift.mean, key=lambda f: -abs(f["t"]))[:limit]]
    if not rows:
        return "\n".join(lines + ["no feature shifted"]) + "\n"
    head = ("feature", "shift", "baseline", "new", "statistic", "p")
    if markdown:
        lines = [f"- {line}" for line in lines] + ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    else:
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        lines += [""] + ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    return "\n".join(lines) + "\n"


def _ids(ids: list[int], limit: int = 20) -> str:
    if not ids:
        return "none"
    shown = ", ".join(map(str, ids[:limit]))
    return f"{len(ids)} ({shown}{', ...' if len(ids) > limit else ''})"


def plot(drift: Drift, path: str | os.PathLike, title: str = "") -> Path:
    """Baseline vs new density of each compared feature, log-log (a density of 0 is drawn at half a count),
    shifted features in red, died and born in orange and green; written as a PNG."""
    from pyinterp.viz.plot import save_png
    from pyinterp.viz.scatter import loglog_scatter

    floor_b, floor_n = 0.5 / drift.n_base, 0.5 / drift.n_new
    x, y = np.maximum(drift.base_density, floor_b), np.maximum(drift.new_density, floor_n)
    kind = np.zeros(len(drift.ids), np.int64)
    where = {int(i): k for k, i in enumerate(drift.ids)}
    for group, ids in ((1, [f["id"] for f in drift.frequency]), (2, drift.died), (3, drift.born)):
        kind[[where[i] for i in ids if i in where]] = group
    title = title or f"feature density: baseline vs new (KL {drift.kl_new_base:.3g} nats)"
    image = loglog_scatter(x, y, kind, ["unchanged", "frequency shifted", "died", "born"], title=title,
                           x_name="baseline density", y_name="new density")
    return save_png(image, path)
