"""Drift: planted shifts (a feature made dead, one born, one firing three times as often, one with a shifted
mean) are found, a run compared with itself shows nothing, and a baseline of another source is refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from pyinterp import InputError
from pyinterp.analysis.drift import compare, load_features, plot, table
from pyinterp.analysis.features import FeatureAccumulator, features_json

D = 40
DIES, BORN, MORE, SHIFTED = 3, 5, 7, 11


def run(seed: int, planted: bool, n_rows: int = 6000, tensor: str = "l_out-5", width: int = D) -> dict:
    """features.json of random sparse features (each fires on about 5% of tokens, values ~ 1 + |N(0, 1)|);
    ``planted``: feature DIES never fires, BORN fires 5%, MORE fires three times as often, SHIFTED is 3 larger."""
    rng = np.random.default_rng(seed)
    rate = np.full(width, 0.05)
    rate[BORN] = 0.05 if planted else 0.0
    rate[DIES] = 0.0 if planted else 0.05
    rate[MORE] = 0.15 if planted else 0.05
    f = (rng.random((n_rows, width)) < rate) * (1 + np.abs(rng.normal(size=(n_rows, width))))
    if planted:
        f[:, SHIFTED] *= 4
    f = f.astype(np.float32)
    acc = FeatureAccumulator(width, top_k=2, window=(1, 1))
    for a in range(0, n_rows, 1000):  # contexts of 100 tokens, 10 per batch
        s = slice(a, a + 1000)
        ids = np.tile(np.arange(width, dtype=np.int32), (1000, 1))
        acc.add(SimpleNamespace(token_ids=np.zeros(1000, np.int32), doc=np.zeros(1000), pos=np.zeros(1000),
                                context=np.arange(a, a + 1000) // 100, tensors={}, sae=(ids, f[s])))
    return features_json(acc.result(), np.arange(width), str, source={"kind": "sae", "tensor": tensor, "sae": "s"},
                         model="m", corpus={"path": "c"}, dense_threshold=0.5)


def test_planted_shifts_are_found(tmp_path):
    base, new = run(0, False), run(1, True)
    drift = compare(base, new, alpha=0.01)
    assert drift.died == [DIES] and drift.born == [BORN]
    assert {f["id"] for f in drift.frequency} == {DIES, BORN, MORE}
    more = next(f for f in drift.frequency if f["id"] == MORE)
    assert more["z"] > 0 and 2 < more["ratio"] < 4 and more["p"] < 0.01 / D
    # mean over all tokens (zeros in): the frequency shifts move it too, and SHIFTED moves only by its mean
    assert SHIFTED in {f["id"] for f in drift.mean}
    assert {f["id"] for f in drift.mean} <= {DIES, BORN, MORE, SHIFTED}
    assert drift.kl_new_base > 0.01 and drift.kl_base_new > 0.01
    text = table(drift)
    assert f"died: 1 ({DIES})" in text and f"born: 1 ({BORN})" in text and "z=" in text
    md = table(drift, markdown=True)
    assert "| feature | shift |" in md and f"| {MORE} | frequency |" in md
    saved = json.loads(json.dumps(drift.to_json()))
    assert saved["died"] == [DIES] and saved["tests"]["bonferroni_threshold"] == pytest.approx(0.01 / D)
    image = cv2.imread(str(plot(drift, tmp_path / "drift.png")))
    assert image is not None and image.shape[0] > 300 and (image < 128).mean() > 0.005
    red = (image[..., 2] > 180) & (image[..., 1] < 80) & (image[..., 0] < 80)  # the shifted points
    assert red.sum() > 20


def test_a_run_against_itself_shows_nothing():
    base = run(0, False)
    drift = compare(base, base)
    assert drift.died == [] and drift.born == [] and drift.frequency == [] and drift.mean == []
    assert drift.kl_new_base == 0 and drift.kl_base_new == 0
    assert "no feature shifted" in table(drift)
    other = compare(base, run(2, False))  # another sample of the same distribution: no false alarm
    assert other.frequency == [] and other.mean == [] and other.kl_new_base < 0.01


def test_baseline_of_another_source_or_width(tmp_path):
    base = run(0, False)
    with pytest.raises(InputError, match="another tensor"):
        compare(base, run(0, False, n_rows=1000, tensor="l_out-6"))
    with pytest.raises(InputError, match="40 units, this run 41: another width"):
        compare(base, run(0, False, n_rows=1000, width=41))
    path = tmp_path / "x.json"
    path.write_text('{"format": "other"}')
    with pytest.raises(InputError, match="not a pyinterp features file"):
        load_features(path)
    path.write_text("{")
    with pytest.raises(InputError, match="is not JSON"):
        load_features(path)
