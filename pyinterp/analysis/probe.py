"""Linear probes across layers: which layers represent a label of the prompts linearly.

For each layer, one tensor's activation (``l_out`` by default) at one position of every prompt of a labelled set
(the last token, or the mean over the tokens after BOS) is the input of a logistic-regression probe
(scikit-learn's ``LogisticRegression`` after a ``StandardScaler``, the ``probe`` extra). Its held-out accuracy
comes from stratified k-fold cross-validation, seeded, and is read against two references:

- the majority baseline: the accuracy of always answering the most frequent label;
- a control task (Hewitt and Liang, 2019): the same probe, same folds, on the labels shuffled (seeded). A probe
  that is only as good on shuffled labels as on the real ones memorizes rather than reads the representation.

The probe fitted on every example gives each layer's direction in activation space: the coefficients with the
scaler undone (``coef / scale``), so ``direction . x + intercept`` is the probe's logit for the raw activation
``x``. For two labels that is one direction, towards the second label (labels sorted); for more, one per label
(the multinomial model's). Saved (:meth:`ProbeResult.save`) as llama.cpp control vectors, a direction steers
the residual stream towards its label (see :mod:`pyinterp.analysis.steering`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import numpy as np

from pyinterp.analysis.stats import markdown_table
from pyinterp.analysis.steering import ControlVector
from pyinterp.corpus.extract import DECODE_TOKENS
from pyinterp.corpus.stream import tensor_keys, widths
from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_write

if TYPE_CHECKING:
    from pyinterp.model import Model

POSITIONS = ("last", "mean")
MAX_ITER = 1000  # lbfgs iterations: enough for a few thousand standardized features on the sets probes see
EXTRA = 'pip install "pyinterp[probe]"'


def sklearn_parts():
    """scikit-learn's pieces a probe uses, or a one-line InputError naming the extra to install."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise InputError(f"probes need scikit-learn: {EXTRA}") from None
    return ConvergenceWarning, LogisticRegression, StratifiedKFold, make_pipeline, StandardScaler


# activations

def _groups(lengths: Sequence[int], budget: int, most: int) -> list[list[int]]:
    """Prompt indices in decode groups: up to ``most`` prompts holding up to ``budget`` tokens together (a longer
    prompt alone)."""
    groups: list[list[int]] = []
    n = 0
    for i, length in enumerate(lengths):
        if groups and len(groups[-1]) < most and n + length <= budget:
            groups[-1].append(i)
            n += length
        else:
            groups.append([i])
            n = length
    return groups


def activations(model: Model, prompts: Sequence[str], tensor: str = "l_out", layers: Sequence[int] | None = None,
                position: str = "last", per_decode: int | None = None,
                on_decode: Callable[[int], None] | None = None) -> np.ndarray:
    """``[n_prompts, len(layers), width]`` float32: ``tensor``'s row of each layer (default every layer it is
    computed on) at the last token of each prompt, or (``position="mean"``) its mean over the tokens after the BOS
    the model adds. The prompts run several to a decode (up to ``per_decode``, default :data:`DECODE_TOKENS`'
    worth, each in its own KV sequence: equal to single runs up to rounding; ``per_decode=1``: bit for bit);
    ``on_decode(n)`` after each decode of ``n`` prompts."""
    if position not in POSITIONS:
        raise InputError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    keys = _layer_keys(model, tensor, layers)
    width = widths(model, {"t": keys[0]})["t"]
    ids = [model.prompt_ids(p) for p in prompts]
    n_bos = len(model.tokenize("")) if position == "mean" else 0
    for i, row in enumerate(ids):
        if len(row) <= n_bos:
            raise InputError(f"prompt {i + 1} ({prompts[i]!r}) has no token besides BOS")
    most = min(model.engine.n_seq_max, per_decode or model.engine.n_seq_max)
    budget = min(model.n_ctx, DECODE_TOKENS if per_decode is None else model.n_ctx)
    out = np.empty((len(ids), len(keys), width), np.float32)
    for group in _groups([len(r) for r in ids], budget, most):
        result = model.engine.run_contexts([ids[i] for i in group], [f"{n}-{il}" for n, il in keys])
        ends = np.cumsum([len(ids[i]) for i in group])
        for k, key in enumerate(keys):
            rows = result.captured[key].reshape(int(ends[-1]), -1)
            for i, end in zip(group, ends):
                start = end - len(ids[i])
                out[i, k] = rows[end - 1] if position == "last" else rows[start + n_bos:end].mean(0)
        if on_decode is not None:
            on_decode(len(group))
    return out


def _layer_keys(model: Model, tensor: str, layers: Sequence[int] | None) -> list[tuple[str, int]]:
    """``(name, layer)`` of ``tensor`` at each of ``layers`` (default every layer it is computed on)."""
    found = model.engine.planner().captures([tensor])
    if any(il < 0 for _, il in found):
        raise InputError(f"-t {tensor}: probes read one tensor of every layer; {tensor!r} has no layers")
    name = found[0][0]
    computed = sorted(il for _, il in found)
    if len(found) == 1 and tensor != name:  # a name of one layer's tensor (l_out-5, blocks.5.hook_resid_post)
        raise InputError(f"-t {tensor}: give the tensor without a layer ({name}) and choose layers with --layers")
    if layers is None:
        layers = computed
    missing = [il for il in layers if il not in computed]
    if missing:
        raise InputError(f"-t {tensor}: tensor {name!r} is not computed on layer {missing[0]}")
    if not layers:
        raise InputError("no layers to probe")
    keys = [(name, il) for il in layers]
    tensor_keys(model, [f"{n}-{il}" for n, il in keys[:1]])  # attention weights have no row per token
    return keys


# labels and fits

def encode_labels(labels: Sequence[str | int], folds: int) -> tuple[np.ndarray, list[str | int]]:
    """Labels as class indices ``[n]`` and the classes (sorted; ints before strings), checked for a
    ``folds``-fold cross-validation: at least two classes, each with at least ``folds`` examples."""
    if folds < 2:
        raise InputError(f"--folds must be at least 2, got {folds}")
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise InputError(f"example {i + 1}: label must be a string or an integer, got {label!r}")
    classes = sorted(set(labels), key=lambda c: (isinstance(c, str), c))
    if len(classes) < 2:
        raise InputError(f"every example has the label {classes[0]!r}: a probe needs at least two classes"
                         if classes else "no examples")
    index = {c: k for k, c in enumerate(classes)}
    y = np.array([index[label] for label in labels])
    counts = np.bincount(y, minlength=len(classes))
    if counts.min() < folds:
        small = classes[int(counts.argmin())]
        raise InputError(f"label {small!r} has {counts.min()} examples, fewer than the {folds} folds "
                         f"(lower --folds or add examples)")
    return y, classes


def _probe(seed: int):
    _, LogisticRegression, _, make_pipeline, StandardScaler = sklearn_parts()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITER, random_state=seed))


def fold_accuracies(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """``[folds]``: held-out accuracy of the probe on each fold of a seeded stratified split of ``x`` ``[n, width]``."""
    ConvergenceWarning, _, StratifiedKFold, _, _ = sklearn_parts()
    out = np.empty(folds)
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # few examples in many dimensions: separable
        for k, (train, test) in enumerate(splits):
            out[k] = _probe(seed).fit(x[train], y[train]).score(x[test], y[test])
    return out


def directions(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The probe fitted on every example, in activation space: ``(coef / scale`` ``[n_dir, width]``, intercepts
    ``[n_dir]``), n_dir 1 for two classes (towards class 1), else one per class."""
    ConvergenceWarning = sklearn_parts()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe = _probe(seed).fit(x, y)
    scaler, logistic = pipe[0], pipe[-1]
    coef = logistic.coef_ / scaler.scale_
    return coef.astype(np.float32), (logistic.intercept_ - coef @ scaler.mean_).astype(np.float32)


# the result

@dataclass
class ProbeResult:
    """Probes of one tensor across layers: accuracies ``[n_layers, folds]`` (the probe and the control task),
    directions ``[n_dir, n_layers, width]`` float32 and intercepts ``[n_dir, n_layers]``."""

    model: str
    arch: str
    n_layer: int                       # the model's layers (the control vector's rows)
    tensor: str
    position: str
    layers: list[int]
    classes: list[str | int]
    counts: list[int]                  # examples per class
    folds: int
    seed: int
    accuracy: np.ndarray
    control: np.ndarray
    directions: np.ndarray
    intercepts: np.ndarray
    files: list[str] = field(default_factory=list)

    HEADER: ClassVar[list[str]] = ["layer", "accuracy", "control", "selectivity"]

    @property
    def baseline(self) -> float:
        """The majority baseline: the share of the most frequent label."""
        return max(self.counts) / sum(self.counts)

    @property
    def best(self) -> int:
        """The layer of the highest mean accuracy (the first of ties)."""
        return self.layers[int(np.argmax(self.accuracy.mean(1)))]

    def rows(self) -> list[list[str]]:
        """One row per layer: layer, accuracy mean ± std, control mean ± std, accuracy minus control."""
        acc, acc_sd = self.accuracy.mean(1), self.accuracy.std(1, ddof=1)
        ctl, ctl_sd = self.control.mean(1), self.control.std(1, ddof=1)
        return [[str(il), f"{acc[k]:.3f} ± {acc_sd[k]:.3f}", f"{ctl[k]:.3f} ± {ctl_sd[k]:.3f}",
                 f"{acc[k] - ctl[k]:+.3f}"] for k, il in enumerate(self.layers)]

    @property
    def title(self) -> str:
        return (f"linear probes of {self.tensor} ({self.position} token{'s' if self.position == 'mean' else ''}) on "
                f"{self.model}: {sum(self.counts)} examples, {len(self.classes)} classes, {self.folds}-fold CV, "
                f"majority baseline {self.baseline:.3f}")

    def table(self) -> str:
        """The text table: title, one line per layer."""
        widths_ = [max(len(r[c]) for r in [self.HEADER, *self.rows()]) for c in range(len(self.HEADER))]
        lines = [" ".join(cell.rjust(w) for cell, w in zip(row, widths_)) for row in [self.HEADER, *self.rows()]]
        return "\n".join([self.title, *lines, f"best layer {self.best}"])

    def markdown(self) -> str:
        """The table as markdown, under the title."""
        return "\n".join([f"**{self.title}**", "", markdown_table(self.HEADER, self.rows())])

    def to_dict(self) -> dict:
        return {
            "model": self.model, "tensor": self.tensor, "position": self.position, "folds": self.folds,
            "seed": self.seed, "n_examples": sum(self.counts),
            "classes": [{"label": c, "count": n} for c, n in zip(self.classes, self.counts)],
            "baseline": self.baseline, "best_layer": self.best,
            "directions": "towards " + repr(self.classes[1]) if len(self.directions) == 1 else "one per class",
            "layers": [self._layer_dict(k) for k in range(len(self.layers))],
            "files": self.files,
        }

    def _layer_dict(self, k: int) -> dict:
        acc, ctl = self.accuracy[k], self.control[k]
        return {"layer": self.layers[k],
                "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)),
                "accuracy_folds": acc.tolist(),
                "control_mean": float(ctl.mean()), "control_std": float(ctl.std(ddof=1)), "control_folds": ctl.tolist(),
                "direction_norm": [float(np.linalg.norm(d[k])) for d in self.directions]}

    def to_png(self, path: str | os.PathLike) -> Path:
        """Write accuracy against layer: the probe, the control task and the majority baseline."""
        from pyinterp.viz.charts import line_charts
        from pyinterp.viz.plot import save_png

        series = {"probe": self.accuracy.mean(1), "control (shuffled labels)": self.control.mean(1),
                  "majority baseline": np.full(len(self.layers), self.baseline)}
        title = (f"linear probes of {self.tensor} on {self.model}\n{sum(self.counts)} examples, {len(self.classes)} "
                 f"classes, {self.folds}-fold CV; best layer {self.best}")
        image = line_charts([("held-out accuracy", series)], [str(il) for il in self.layers], title=title,
                            legend_bottom=True)
        return save_png(image, path)

    def control_vectors(self) -> list[ControlVector]:
        """Each direction as a llama.cpp control vector (the layers >= 1: llama.cpp never steers layer 0)."""
        return [ControlVector.from_layers({il: d[k] for k, il in enumerate(self.layers) if il > 0}, self.arch)
                for d in self.directions]

    def save(self, directory: str | os.PathLike, n_embd: int) -> list[Path]:
        """Write ``probe.json`` (this result), ``probe.npz`` (``directions`` ``[n_dir, n_layer, width]`` float32, the
        rows of unprobed layers zero; ``intercepts`` ``[n_dir, n_layer]``; ``classes``) and, when the tensor is
        ``n_embd`` wide and a layer >= 1 was probed, the directions as control vectors: ``probe.gguf`` (two classes)
        or ``probe-<k>.gguf`` for class k (more). Returns the files."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise InputError(f"--save: {directory} is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        full = np.zeros((len(self.directions), self.n_layer, self.directions.shape[2]), np.float32)
        full[:, self.layers] = self.directions
        bias = np.zeros((len(self.directions), self.n_layer), np.float32)
        bias[:, self.layers] = self.intercepts
        files = []
        if self.directions.shape[2] == n_embd and any(il > 0 for il in self.layers):
            n = len(self.directions)
            names = ["probe.gguf"] if n == 1 else [f"probe-{k}.gguf" for k in range(n)]
            files += [cv.save(directory / name) for cv, name in zip(self.control_vectors(), names)]
        npz = directory / "probe.npz"
        with atomic_write(npz) as f:
            np.savez(f, directions=full, intercepts=bias, layers=np.array(self.layers),
                     classes=np.array([str(c) for c in self.classes]))
        files += [npz, directory / "probe.json"]
        with atomic_write(directory / "probe.json") as f:
            f.write(json.dumps({**self.to_dict(), "files": [p.name for p in files]}, ensure_ascii=False,
                               indent=1).encode())
        return files


def probe(model: Model, prompts: Sequence[str], labels: Sequence[str | int], *, tensor: str = "l_out",
          layers: Sequence[int] | None = None, position: str = "last", folds: int = 5, seed: int = 0,
          per_decode: int | None = None, on_decode: Callable[[int], None] | None = None,
          on_layer: Callable[[int], None] | None = None) -> ProbeResult:
    """Fit and cross-validate a probe of ``labels`` on ``tensor`` at each of ``layers`` (see the module's
    docstring and :func:`activations`); ``on_decode``/``on_layer``: progress."""
    if len(prompts) != len(labels):
        raise InputError(f"{len(prompts)} prompts and {len(labels)} labels")
    y, classes = encode_labels(labels, folds)
    sklearn_parts()  # before the model runs
    keys = _layer_keys(model, tensor, layers)
    x = activations(model, prompts, tensor, [il for _, il in keys], position, per_decode, on_decode)
    shuffled = np.random.default_rng(seed).permutation(y)
    accuracy, control, dirs, bias = [], [], [], []
    for k in range(x.shape[1]):
        accuracy.append(fold_accuracies(x[:, k], y, folds, seed))
        control.append(fold_accuracies(x[:, k], shuffled, folds, seed))
        d, b = directions(x[:, k], y, seed)
        dirs.append(d)
        bias.append(b)
        if on_layer is not None:
            on_layer(keys[k][1])
    return ProbeResult(model.path.name, model.arch, model.n_layer, keys[0][0], position, [il for _, il in keys],
                       classes, np.bincount(y).tolist(), folds, seed, np.array(accuracy), np.array(control),
                       np.stack(dirs, 1), np.stack(bias, 1))
