"""Streaming statistics of neurons and SAE features over a corpus, in memory independent of its size.

The input is a stream of ``Batch`` objects (:mod:`pyinterp.corpus.stream`): per row ``token_ids``, ``doc``,
``pos`` and ``context`` ``[n_rows]``, the captured ``tensors[name]`` ``[n_rows, width]`` and, with an SAE
encoded in the graph, ``sae = (ids, values)`` ``[n_rows, k]`` (unordered; inactive slots have value 0). A
context's rows are consecutive and never split across batches, so an example's window is cut from the batch
that holds it.

A *unit* is a column of the tensor (a neuron) or an SAE feature. Per unit, over every row (zeros included):

- ``count``: rows with activation > 0; ``density`` = count / n_tokens;
- ``mean`` and ``std`` (population): each batch's moments in float64, merged with Chan et al.'s parallel
  formula (``M2 = M2_a + M2_b + delta^2 n_a n_b / n``);
- ``max`` and ``min``;
- a histogram of the non-zero activations in :data:`N_BINS` bins on a grid aligned to 0 of width ``2^e``:
  when a value falls outside, ``e`` grows and pairs of bins merge exactly (counts never move between bins
  that do not overlap), so the bins are fixed in number and the counts sum to the non-zero rows;
- the top-k examples: the rows of largest activation (> 0 only; ties: the earlier row), each with its
  window of ``before`` tokens before and ``after`` after it in the same context, and the unit's value on each.

Memory: ``O(n_units * (N_BINS + k * (before + after + 1)))``, whatever the corpus size. Per batch the work is
vectorised numpy: moments over the dense ``[n_rows, width]`` rows, or ``np.bincount`` over the sparse SAE
entries; top-k candidates by ``np.argpartition`` (dense) or one ``np.lexsort`` (sparse), merged with the
running table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyinterp.errors import InputError

N_BINS = 64
NO_ROW = np.iinfo(np.int64).max  # the global row of an empty top-k slot (sorts last)
CHUNK = 4096  # windows cut at a time (bounds the [chunk, window, k] temporaries of the sparse lookup)


@dataclass
class Top:
    """Top-k examples per tracked unit; ``[n_tracked, k]`` (``value`` -inf and ``row`` NO_ROW: empty), the
    windows ``[n_tracked, k, before + after + 1]`` centred on the example (token -1, value 0: outside the
    context)."""

    value: np.ndarray    # [m, k] float32
    row: np.ndarray      # [m, k] int64: global row index (corpus order), for ties
    doc: np.ndarray      # [m, k] int64
    pos: np.ndarray      # [m, k] int32
    context: np.ndarray  # [m, k] int64
    tokens: np.ndarray   # [m, k, L] int32
    values: np.ndarray   # [m, k, L] float32

    @classmethod
    def empty(cls, m: int, k: int, length: int) -> "Top":
        return cls(np.full((m, k), -np.inf, np.float32), np.full((m, k), NO_ROW, np.int64),
                   np.zeros((m, k), np.int64), np.zeros((m, k), np.int32), np.zeros((m, k), np.int64),
                   np.full((m, k, length), -1, np.int32), np.zeros((m, k, length), np.float32))


class Histogram:
    """Per-unit histograms of :data:`N_BINS` bins of width ``2^exp[u]`` starting at ``start[u] * 2^exp[u]``."""

    def __init__(self, n_units: int, n_bins: int = N_BINS) -> None:
        self.n_bins = n_bins
        self.counts = np.zeros((n_units, n_bins), np.int64)
        self.exp = np.zeros(n_units, np.int64)
        self.start = np.zeros(n_units, np.int64)
        self.lo = np.full(n_units, np.nan)  # smallest and largest value counted so far (NaN: none yet)
        self.hi = np.full(n_units, np.nan)

    def _fit(self, lo: np.ndarray, hi: np.ndarray, units: np.ndarray) -> None:
        """Grow the range of ``units`` to hold ``[lo, hi]`` (float64 ``[n]``), merging pairs of bins as needed."""
        used = ~np.isnan(self.lo[units])
        lo, hi = np.fmin(lo, self.lo[units]), np.fmax(hi, self.hi[units])
        old_exp, old_start = self.exp[units], self.start[units]
        span = np.maximum(hi - lo, np.maximum(np.abs(hi), np.abs(lo)) * 1e-6) + 1e-30
        exp = np.where(used, old_exp, np.floor(np.log2(span / self.n_bins)).astype(np.int64))
        while True:
            bad = np.floor(np.ldexp(hi, -exp)) - np.floor(np.ldexp(lo, -exp)) >= self.n_bins
            if not bad.any():
                break
            exp[bad] += 1
        start = np.floor(np.ldexp(lo, -exp)).astype(np.int64)
        moved = used & ((exp != old_exp) | (start != old_start))
        if moved.any():
            rows = self.counts[units[moved]]
            absolute = old_start[moved, None] + np.arange(self.n_bins)
            new_bin = (absolute >> (exp[moved] - old_exp[moved])[:, None]) - start[moved, None]
            new_bin = np.clip(new_bin, 0, self.n_bins - 1)  # only empty bins of the old range can fall outside
            merged = np.zeros_like(rows)
            np.add.at(merged, (np.arange(len(rows))[:, None].repeat(self.n_bins, 1), new_bin), rows)
            self.counts[units[moved]] = merged
        self.exp[units], self.start[units], self.lo[units], self.hi[units] = exp, start, lo, hi

    def add(self, units: np.ndarray, values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Count ``values`` ``[n]`` of ``units`` ``[n]``; ``lo``/``hi`` ``[n_units]``: each unit's smallest and
        largest of them (NaN: none)."""
        has = np.flatnonzero(~np.isnan(lo))
        if has.size == 0:
            return
        self._fit(lo[has].astype(np.float64), hi[has].astype(np.float64), has)
        bins = np.floor(np.ldexp(values.astype(np.float64), -self.exp[units])).astype(np.int64) - self.start[units]
        bins = np.clip(bins, 0, self.n_bins - 1)  # rounding at the very top edge
        self.counts += np.bincount(units * self.n_bins + bins, minlength=self.counts.size).reshape(self.counts.shape)

    def of(self, unit: int) -> dict:
        """``{"edges": [n + 1], "counts": [n]}`` of one unit, trimmed to its non-empty bins."""
        live = np.flatnonzero(self.counts[unit])
        if live.size == 0:
            return {"edges": [], "counts": []}
        a, b = live[0], live[-1] + 1
        edges = np.ldexp((self.start[unit] + np.arange(a, b + 1)).astype(np.float64), int(self.exp[unit]))
        return {"edges": edges.tolist(), "counts": self.counts[unit, a:b].tolist()}


def _context_bounds(context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First row and end row (exclusive) of each row's context, ``[n_rows]`` each (rows of a context are
    consecutive)."""
    n = len(context)
    starts = np.flatnonzero(np.r_[True, context[1:] != context[:-1]])
    ends = np.r_[starts[1:], n]
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    return starts[group], ends[group]


class Rows:
    """One batch's activations of every unit: ``dense`` ``[n_rows, n_units]``, or the sparse SAE entries."""

    def __init__(self, n_units: int, dense: np.ndarray | None = None,
                 sparse: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.n_units, self.dense = n_units, dense
        if dense is not None:
            self.n_rows = dense.shape[0]
            return
        ids, values = sparse
        self.n_rows = ids.shape[0]
        self.ids, self.values = ids, values
        live = values != 0
        if np.any((ids[live] < 0) | (ids[live] >= n_units)):
            raise InputError(f"an SAE feature id of the batch is outside 0..{n_units - 1}")
        row = np.broadcast_to(np.arange(self.n_rows)[:, None], ids.shape)[live]
        unit, value = ids[live].astype(np.int64), values[live].astype(np.float32)
        order = np.lexsort((row, -value, unit))  # by unit, then value descending, then row
        self.row, self.unit, self.value = row[order], unit[order], value[order]
        self.first = np.flatnonzero(np.r_[True, self.unit[1:] != self.unit[:-1]]) if len(order) else order

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The positive activations: batch row, unit and value, each ``[n]``."""
        if self.dense is not None:
            row, unit = np.nonzero(self.dense > 0)
            return row, unit, self.dense[row, unit]
        live = self.value > 0
        return self.row[live], self.unit[live], self.value[live]

    def value_at(self, rows: np.ndarray, units: np.ndarray) -> np.ndarray:
        """Activation of ``units[i]`` at batch row ``rows[i, j]``: ``[n, L]`` float32."""
        if self.dense is not None:
            return self.dense[rows, units[:, None]]
        out = np.empty(rows.shape, np.float32)
        for a in range(0, len(rows), CHUNK):
            r, u = rows[a:a + CHUNK], units[a:a + CHUNK]
            hit = self.ids[r] == u[:, None, None]
            out[a:a + CHUNK] = (self.values[r] * hit).sum(-1)
        return out


class FeatureAccumulator:
    """Running statistics of ``n_units`` units (see the module docstring); :meth:`add` one batch at a time.

    ``tensor``: the key of ``Batch.tensors`` for neurons, or None for the SAE features of ``Batch.sae``.
    ``track``: the units that get top-k examples and windows (default all). ``window = (before, after)``.
    """

    def __init__(self, n_units: int, *, tensor: str | None = None, track: np.ndarray | None = None,
                 top_k: int = 10, window: tuple[int, int] = (10, 5), n_bins: int = N_BINS) -> None:
        if n_units < 1 or top_k < 1 or min(window) < 0:
            raise InputError(f"need n_units >= 1, top_k >= 1 and a window >= 0, got {n_units}, {top_k}, {window}")
        self.n_units, self.tensor, self.k, self.window = n_units, tensor, top_k, window
        self.track = np.arange(n_units) if track is None else np.asarray(track, np.int64)
        self.n = 0
        self.n_contexts = 0
        self.count = np.zeros(n_units, np.int64)
        self.mean = np.zeros(n_units, np.float64)
        self.m2 = np.zeros(n_units, np.float64)
        self.max = np.full(n_units, -np.inf)
        self.min = np.full(n_units, np.inf)
        self.hist = Histogram(n_units, n_bins)
        self.top = Top.empty(len(self.track), top_k, sum(window) + 1)

    def rows(self, batch) -> Rows:
        """The batch's activations of the units (checked against the width)."""
        if self.tensor is None:
            if batch.sae is None:
                raise InputError("the batch has no SAE features (Batch.sae is None)")
            return Rows(self.n_units, sparse=batch.sae)
        if self.tensor not in batch.tensors:
            raise InputError(f"the batch has no tensor {self.tensor!r} (it has {', '.join(batch.tensors) or 'none'})")
        dense = np.asarray(batch.tensors[self.tensor], np.float32)
        if dense.ndim != 2 or dense.shape[1] != self.n_units:
            raise InputError(f"tensor {self.tensor} rows are {list(dense.shape)}, expected [n_rows, {self.n_units}]")
        return Rows(self.n_units, dense=dense)

    def add(self, batch) -> Rows:
        """Fold one batch into the statistics; returns its activations."""
        rows = self.rows(batch)
        if rows.n_rows == 0:
            return rows
        if rows.dense is not None:
            moments, lo, hi = self._dense_moments(rows.dense)
            nz_row, nz_unit = np.nonzero(rows.dense)
            self.hist.add(nz_unit, rows.dense[nz_row, nz_unit], lo, hi)
            cand = self._dense_candidates(rows.dense)
        else:
            moments, lo, hi = self._sparse_moments(rows)
            self.hist.add(rows.unit, rows.value, lo, hi)
            cand = self._sparse_candidates(rows)
        self._merge_moments(rows.n_rows, *moments)
        self._merge_top(batch, rows, *cand)
        self.n += rows.n_rows
        self.n_contexts += int(np.count_nonzero(np.r_[True, batch.context[1:] != batch.context[:-1]]))
        return rows

    def _dense_moments(self, x: np.ndarray):
        """Per-unit count, mean, M2, max, min of ``x`` ``[n_rows, n_units]``, and the non-zero min/max (NaN: none)."""
        mean = x.mean(0, dtype=np.float64)
        m2 = ((x - mean) ** 2).sum(0, dtype=np.float64)
        nonzero = x != 0
        has = nonzero.any(0)
        lo = np.where(has, np.where(nonzero, x, np.inf).min(0), np.nan)
        hi = np.where(has, np.where(nonzero, x, -np.inf).max(0), np.nan)
        return ((x > 0).sum(0), mean, m2, x.max(0), x.min(0)), lo, hi

    def _sparse_moments(self, rows: Rows):
        """The same for sparse entries: every absent (unit, row) is a 0."""
        n, u, v = rows.n_rows, rows.unit, rows.value.astype(np.float64)
        total = np.bincount(u, v, self.n_units)
        mean = total / n
        m2 = np.maximum(np.bincount(u, v * v, self.n_units) - n * mean * mean, 0.0)
        present = np.bincount(u, minlength=self.n_units)
        lo, hi = np.full(self.n_units, np.nan), np.full(self.n_units, np.nan)
        if len(u):
            last = np.r_[rows.first[1:], len(u)] - 1
            hi[u[rows.first]], lo[u[rows.first]] = v[rows.first], v[last]  # sorted by value, descending
        full = present == n  # a unit active on every row has no zero
        mx = np.where(np.isnan(hi), 0.0, np.where(full, hi, np.maximum(hi, 0.0)))
        mn = np.where(np.isnan(lo), 0.0, np.where(full, lo, np.minimum(lo, 0.0)))
        return (np.bincount(u[v > 0], minlength=self.n_units), mean, m2, mx, mn), lo, hi

    def _merge_moments(self, n_b: int, count, mean_b, m2_b, mx, mn) -> None:
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta * delta * (self.n * n_b / n)
        self.count += count
        np.maximum(self.max, mx, out=self.max)
        np.minimum(self.min, mn, out=self.min)

    def _dense_candidates(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The batch's k largest positive activations of each tracked unit: values and rows ``[m, k]``."""
        xt = x[:, self.track]
        kk = min(self.k, x.shape[0])
        idx = np.argpartition(-xt, kk - 1, axis=0)[:kk].T  # [m, kk]
        val = np.take_along_axis(xt.T, idx, axis=1)
        return self._pad(np.where(val > 0, val, -np.inf), np.where(val > 0, idx, -1))

    def _sparse_candidates(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        slot = np.full(self.n_units, -1, np.int64)
        slot[self.track] = np.arange(len(self.track))
        starts = np.repeat(rows.first, np.diff(np.r_[rows.first, len(rows.unit)]))
        rank = np.arange(len(rows.unit)) - starts  # place in the unit's group (sorted by value, then row)
        keep = (slot[rows.unit] >= 0) & (rank < self.k) & (rows.value > 0)
        val = np.full((len(self.track), self.k), -np.inf, np.float32)
        row = np.full((len(self.track), self.k), -1, np.int64)
        val[slot[rows.unit[keep]], rank[keep]] = rows.value[keep]
        row[slot[rows.unit[keep]], rank[keep]] = rows.row[keep]
        return val, row

    def _pad(self, val: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extra = self.k - val.shape[1]
        if extra == 0:
            return val.astype(np.float32), row.astype(np.int64)
        return (np.pad(val.astype(np.float32), ((0, 0), (0, extra)), constant_values=-np.inf),
                np.pad(row.astype(np.int64), ((0, 0), (0, extra)), constant_values=-1))

    def _merge_top(self, batch, rows: Rows, cand_val: np.ndarray, cand_row: np.ndarray) -> None:
        """Keep the k best of the running table and the batch's candidates; cut the windows of the new ones."""
        k, top = self.k, self.top
        grow = np.where(cand_row >= 0, self.n + cand_row, NO_ROW)
        all_val, all_row = np.concatenate([top.value, cand_val], 1), np.concatenate([top.row, grow], 1)
        order = np.lexsort((all_row, -all_val), axis=1)[:, :k]
        new = order >= k
        old_idx = np.where(new, 0, order)
        merged = Top(*(np.take_along_axis(a, old_idx if a.ndim == 2 else old_idx[..., None], 1)
                       for a in (top.value, top.row, top.doc, top.pos, top.context, top.tokens, top.values)))
        slot, j = np.nonzero(new & (np.take_along_axis(all_val, order, 1) > -np.inf))
        brow = cand_row[slot, order[slot, j] - k]
        merged.value[slot, j] = cand_val[slot, order[slot, j] - k]
        merged.row[slot, j] = self.n + brow
        merged.doc[slot, j], merged.pos[slot, j] = batch.doc[brow], batch.pos[brow]
        merged.context[slot, j] = batch.context[brow]
        merged.tokens[slot, j], merged.values[slot, j] = self._windows(batch, rows, brow, self.track[slot])
        empty = new & (np.take_along_axis(all_val, order, 1) == -np.inf)
        merged.value[empty], merged.row[empty] = -np.inf, NO_ROW
        merged.tokens[empty] = -1
        self.top = merged

    def _windows(self, batch, rows: Rows, brow: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and the unit's values ``[n, before + after + 1]`` around batch rows ``brow`` ``[n]``."""
        before, after = self.window
        start, end = _context_bounds(np.asarray(batch.context))
        where = brow[:, None] + np.arange(-before, after + 1)
        inside = (where >= start[brow, None]) & (where < end[brow, None])
        where = np.clip(where, 0, rows.n_rows - 1)
        tokens = np.where(inside, np.asarray(batch.token_ids)[where], -1).astype(np.int32)
        values = np.where(inside, rows.value_at(where, units), 0).astype(np.float32)
        return tokens, values

    def result(self) -> "FeatureStats":
        """The statistics so far; an InputError when no row was seen."""
        if self.n == 0:
            raise InputError("the corpus is empty: no token was read")
        return FeatureStats(self.n, self.n_contexts, self.count.copy(), self.mean.copy(),
                            np.sqrt(self.m2 / self.n), self.max.copy(), self.min.copy(), self.hist, self.track.copy(),
                            self.top, self.window)


@dataclass
class FeatureStats:
    """Finished statistics of ``n_units`` units over ``n_tokens`` rows: arrays ``[n_units]`` (``std`` is the
    population standard deviation), the histograms, and the top examples of the ``track``-ed units."""

    n_tokens: int
    n_contexts: int
    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    min: np.ndarray
    hist: Histogram
    track: np.ndarray
    top: Top
    window: tuple[int, int]

    @property
    def n_units(self) -> int:
        return len(self.count)

    @property
    def density(self) -> np.ndarray:
        return self.count / self.n_tokens

    def dead(self) -> np.ndarray:
        """Units never > 0."""
        return np.flatnonzero(self.count == 0)

    def dense(self, threshold: float) -> np.ndarray:
        """Units > 0 on more than ``threshold`` of the tokens."""
        return np.flatnonzero(self.density > threshold)

    def examples(self, unit: int, token_str) -> list[dict]:
        """The top examples of a tracked ``unit`` as the JSON schema has them (``token_str(id) -> str``)."""
        slots = np.flatnonzero(self.track == unit)
        if slots.size == 0:
            return []
        slot, out = slots[0], []
        for j in np.flatnonzero(self.top.value[slot] > -np.inf):
            inside = self.top.tokens[slot, j] >= 0
            first = int(np.argmax(inside))
            out.append({"value": float(self.top.value[slot, j]), "doc": int(self.top.doc[slot, j]),
                        "pos": int(self.top.pos[slot, j]), "context": int(self.top.context[slot, j]),
                        "tokens": [token_str(int(t)) for t in self.top.tokens[slot, j][inside]],
                        "values": [float(v) for v in self.top.values[slot, j][inside]],
                        "index": self.window[0] - first})
        return out

    def unit_json(self, unit: int, token_str) -> dict:
        """One entry of ``features`` in features.json (without ``logits``)."""
        return {"id": int(unit), "count": int(self.count[unit]), "density": float(self.density[unit]),
                "mean": float(self.mean[unit]), "std": float(self.std[unit]), "max": float(self.max[unit]),
                "min": float(self.min[unit]), "hist": self.hist.of(unit), "top": self.examples(unit, token_str)}


def select_units(stats: FeatureStats, features: list[int] | None, top_features: int | None) -> np.ndarray:
    """The units features.json lists, in id order: ``features`` (each checked), the ``top_features`` of
    highest density (ties: lower id), or every unit."""
    if features is not None:
        bad = [f for f in features if not 0 <= f < stats.n_units]
        if bad:
            raise InputError(f"feature {bad[0]} out of range (there are {stats.n_units} units: 0..{stats.n_units - 1})")
        return np.array(sorted(set(features)), np.int64)
    if top_features is not None:
        order = np.lexsort((np.arange(stats.n_units), -stats.count))
        return np.sort(order[:top_features])
    return np.arange(stats.n_units)


def features_json(stats: FeatureStats, units: np.ndarray, token_str, *, source: dict, model: str, corpus: dict,
                  dense_threshold: float, logits: list[dict] | None = None) -> dict:
    """features.json (format ``pyinterp.features/1``) of ``units`` (ids, in order); ``logits``: one
    ``{"promoted", "suppressed"}`` per unit, or None (units without a decoder direction)."""
    features = []
    for i, unit in enumerate(units):
        entry = stats.unit_json(int(unit), token_str)
        if logits is not None:
            entry["logits"] = logits[i]
        features.append(entry)
    return {"format": "pyinterp.features/1", "model": model, "source": source,
            "corpus": {**corpus, "n_tokens": stats.n_tokens, "n_contexts": stats.n_contexts},
            "n_units": stats.n_units, "dense_threshold": dense_threshold,
            "dead": stats.dead().tolist(), "dense": stats.dense(dense_threshold).tolist(), "features": features}
