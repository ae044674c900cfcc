"""The HTML feature dashboard, loaded in a real headless browser (Debian's chromium).

The page records uncaught errors and ``console.error`` calls on ``<html data-errors>`` and sets
``data-ready`` when its script finished; ``chromium --dump-dom`` prints the DOM after the scripts ran, its
``--enable-logging=stderr`` prints every console message as a ``CONSOLE`` line (the page logs nothing when all
is well), and ``--screenshot`` writes a PNG. The interactions (sorting, filtering, paging, selecting) are driven
through the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (:class:`Browser`). The statistics come from a synthetic features.json dict with
unicode, HTML special characters, negative values and dead features.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from pyinterp.errors import InputError
from pyinterp.viz.dashboard import render_dashboard, write_dashboard

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

INJECTION = "</script><script>document.documentElement.setAttribute('data-pwned','1')</script>"
WORDS = ["The", " cat", " sat", " on", " the", " mat", ".", "\n", " Paris", " café", " 東京", " naïve", " <b>",
         " &amp;", " a&b", " ", "  ", "\t", " \"quoted\"", " it's", "<script>", " 🙂", " x<y", INJECTION,
         "<!--", " <img src=x onerror=\"document.documentElement.setAttribute('data-pwned','2')\">"]


def fixture_stats(n: int = 50, n_top: int = 8, window: int = 24, seed: int = 0, words: list[str] = WORDS) -> dict:
    """A features.json dict (format pyinterp.features/1) of ``n`` features with random statistics, tokens drawn
    from ``words``; features 3 and 9 are dead (no top examples, no histogram counts), 4 is dense, 7 has no logit
    effects, and feature 17's first example holds the INJECTION token at its activating place."""
    rng = np.random.default_rng(seed)
    n_tokens, dead, dense = 7677, [3, 9], [4]
    features = []
    for i in range(n):
        edges = np.linspace(float(-rng.random()), float(1 + 5 * rng.random()), 21)
        count = 0 if i in dead else int(rng.integers(1, n_tokens // (3 if i in dense else 20)))
        top = [] if i in dead else [_example(rng, edges[-1] * (1 - k / (2 * n_top)), window, words)
                                    for k in range(n_top)]
        feature = {
            "id": i, "count": count, "density": count / n_tokens,
            "mean": 0.0 if i in dead else float(rng.normal(0.1, 0.2)), "std": 0.0 if i in dead else float(rng.random()),
            "max": 0.0 if i in dead else float(edges[-1]), "min": 0.0 if i in dead else float(edges[0]),
            "hist": {"edges": edges.tolist(), "counts": [0] * 20 if i in dead else
                     (rng.exponential(200, 20) * np.exp(-np.arange(20) / 4)).astype(int).tolist()},
            "top": top,
            "logits": {"promoted": [_logit(rng, 1, words) for _ in range(6)],
                       "suppressed": [_logit(rng, -1, words) for _ in range(6)]},
        }
        if i == 7:
            del feature["logits"]
        features.append(feature)
    if n > 17:
        features[17]["top"][0]["tokens"][features[17]["top"][0]["index"]] = INJECTION
    return {
        "format": "pyinterp.features/1", "model": "smollm2-135m.gguf",
        "source": {"kind": "sae", "tensor": "blocks.5.hook_resid_post", "sae": "saes/res5 <&> v2"},
        "corpus": {"path": "corpus/wiki.txt", "n_tokens": n_tokens, "n_contexts": 60, "context_size": 128},
        "n_units": 2 * n, "dense_threshold": 0.1, "dead": dead, "dense": dense, "features": features,
    }


def _example(rng: np.random.Generator, value: float, window: int, words: list[str]) -> dict:
    index = int(rng.integers(0, window))
    values = np.where(rng.random(window) < 0.3, np.maximum(rng.normal(0, value / 3, window), -value / 5), 0.0)
    values[index] = value
    return {"value": float(value), "doc": int(rng.integers(0, 60)), "pos": int(rng.integers(0, 128)),
            "context": int(rng.integers(0, 60)), "index": index,
            "tokens": [words[int(k)] for k in rng.integers(0, len(words), window)], "values": values.tolist()}


def _logit(rng: np.random.Generator, sign: int, words: list[str]) -> dict:
    k = int(rng.integers(0, len(words)))
    return {"token": words[k], "id": 1000 + k, "value": sign * float(rng.random())}


class Elements(HTMLParser):
    """The start tags of a DOM dump (tag, attributes) and the text inside each element with a given class."""

    def __init__(self, text_of_class: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.texts: list[str] = []
        self._class, self._depth = text_of_class, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if self._depth:
            self._depth += 1
        elif self._class in (attrs.get("class") or "").split():
            self._depth = 1
            self.texts.append("")

    def handle_endtag(self, tag):
        if self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._depth:
            self.texts[-1] += data


def chromium(args: list[str], page: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run headless chromium on ``page`` (a file URL, ``#fragment`` allowed) with ``args``."""
    url = page.as_uri() if isinstance(page, Path) else page
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def load(page: Path | str, tmp_path: Path) -> tuple[str, dict, list[str]]:
    """The DOM after the page's scripts ran (the <script> elements left out: their source is not what the page
    shows), the <html> attributes, and the console messages."""
    run = chromium(["--dump-dom"], page, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    dom = re.sub(r"<script\b.*?</script>", "", run.stdout, flags=re.S)
    parser = Elements("ex")
    parser.feed(dom)
    return dom, parser.tags[0][1] if parser.tags else {}, console


def dashboard(tmp_path: Path, stats: dict) -> Path:
    path = tmp_path / "features.html"
    write_dashboard(stats, path)
    return path


def test_embedded_json_cannot_close_the_script(tmp_path):
    stats = fixture_stats()
    html = render_dashboard(stats)
    block = re.search(r'<script type="application/json" id="stats">(.*?)</script>', html, re.S).group(1)
    assert "<" not in block and ">" not in block
    same(json.loads(block), stats)  # the escapes are plain JSON: the data come back (floats to 6 digits)
    # self-contained: no URL but the SVG namespace, nothing loaded from elsewhere
    assert set(re.findall(r"[a-z]+://[^\s\"']*", html.replace(block, ""))) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", html.replace(block, ""))


def same(got, want) -> None:
    """Assert that two JSON values are equal, floats to a relative 1e-5."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            same(got[key], want[key])
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            same(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-300)
    else:
        assert got == want and type(got) is type(want)


def test_bad_statistics_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="format"):
        write_dashboard({"format": "something/2", "features": []}, tmp_path / "a.html")
    with pytest.raises(InputError, match="integer 'id'"):
        write_dashboard({"format": "pyinterp.features/1", "features": [{"density": 0.1}]}, tmp_path / "a.html")
    with pytest.raises(InputError, match="not a directory"):
        write_dashboard(fixture_stats(3), tmp_path / "missing" / "a.html")
    assert not list(tmp_path.iterdir())


@needs_chromium
def test_dashboard_loads_without_errors_and_shows_every_feature(tmp_path):
    stats = fixture_stats()
    stats["features"][12]["max"] = float("nan")  # non-finite numbers become null, shown as "–"
    path = dashboard(tmp_path, stats)
    dom, root, console = load(path, tmp_path)
    assert root.get("data-ready") == "1" and "data-errors" not in root, root.get("data-errors")
    assert console == []
    parser = Elements("ex")
    parser.feed(dom)
    rows = [int(a["data-id"]) for tag, a in parser.tags if tag == "tr" and "row" in a.get("class", "")]
    assert rows == list(range(50))
    assert "1–50 of 50 features" in dom
    assert dom.count('class="badge dead"') == 2 and 'class="badge dense"' in dom

    # a chosen feature (by the URL fragment): its examples, in order, with its tokens and the activating one
    chosen = stats["features"][21]
    dom, root, console = load(path.as_uri() + "#f=21", tmp_path)
    assert root.get("data-ready") == "1" and "data-errors" not in root and console == []
    assert 'data-feature="21"' in dom
    parser = Elements("ex")
    parser.feed(dom)
    assert len(parser.texts) == len(chosen["top"])
    for text, example in zip(parser.texts, chosen["top"]):
        assert text.startswith(f"{example['value']:.4g}")
    acts = [a for tag, a in parser.tags if tag == "span" and a.get("class", "").split()[:1] == ["act"]]
    assert len(acts) == len(chosen["top"])
    for a, example in zip(acts, chosen["top"]):  # orange, opacity = value / the feature's max
        rgba = re.fullmatch(r"background: rgba?\(255, 130, 20(?:, ([\d.]+))?\);", a["style"])
        assert rgba, a["style"]
        assert float(rgba.group(1) or 1) == pytest.approx(example["value"] / chosen["max"], abs=0.006)  # 8-bit alpha
        assert a["title"] == f"{json.dumps(example['tokens'][example['index']], ensure_ascii=False)}: {example['value']:.4g}"


@needs_chromium
def test_dead_feature_and_injected_tokens(tmp_path):
    path = dashboard(tmp_path, fixture_stats())
    dom, root, console = load(path.as_uri() + "#f=3", tmp_path)
    assert root.get("data-ready") == "1" and "data-errors" not in root and console == []
    assert "no activating examples (dead feature)" in dom

    # feature 17's activating token is INJECTION; tokens are text, never markup: nothing runs, the list stays
    dom, root, console = load(path.as_uri() + "#f=17", tmp_path)
    assert root.get("data-ready") == "1" and "data-errors" not in root and console == []
    assert "data-pwned" not in root
    assert "&lt;/script&gt;&lt;script&gt;document.documentElement" in dom
    assert dom.count('<tr class="row') == 50
    assert "no logit effects" not in dom
    dom, _, _ = load(path.as_uri() + "#f=7", tmp_path)
    assert "no logit effects (no decoder direction)" in dom


@needs_chromium
def test_ten_thousand_features_render_one_page(tmp_path):
    small = fixture_stats(n=10_000, n_top=3, window=12)
    path = dashboard(tmp_path, small)
    dom, root, console = load(path.as_uri() + "#f=9876", tmp_path)
    assert root.get("data-ready") == "1" and "data-errors" not in root and console == []
    assert dom.count('<tr class="row') == 100  # one page of the list
    assert "9801–9900 of 10000 features" in dom  # the page that holds the chosen feature
    assert 'data-feature="9876"' in dom and dom.count('class="ex"') == 3


@needs_chromium
def test_screenshot_is_not_blank(tmp_path):
    path = dashboard(tmp_path, fixture_stats())
    png = tmp_path / "shot.png"
    run = chromium([f"--screenshot={png}", "--window-size=1280,800"], path.as_uri() + "#f=21", tmp_path)
    assert run.returncode == 0 and png.exists(), run.stderr[-2000:]
    image = cv2.imread(str(png))
    assert image.shape[:2] == (800, 1280)
    colours = np.unique(image.reshape(-1, 3) // 16, axis=0)
    assert image.std() > 20 and len(colours) > 30
    # the shaded tokens: many orange pixels (R high, B low)
    orange = (image[..., 2] > 200) & (image[..., 0] < 150) & (image[..., 1] > 120)
    assert orange.sum() > 500


class Browser:
    """Headless chromium driven through the DevTools Protocol over ``--remote-debugging-pipe`` (it reads
    NUL-terminated JSON commands on fd 3 and answers on fd 4): one page, JavaScript evaluated in it, its
    exceptions and console errors collected in ``errors``."""

    def __init__(self, tmp_path: Path):
        to_chromium, self._out = os.pipe()
        self._in, from_chromium = os.pipe()

        def fds() -> None:  # in the child: the pipe ends on fds 3 and 4, inheritable
            read, write = os.dup(to_chromium), os.dup(from_chromium)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,800",
             f"--user-data-dir={tmp_path / 'cdp-profile'}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chromium)
        os.close(from_chromium)
        self._buffer, self._id, self.errors = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", session=self.session)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send a command and return its result (the events that come first are scanned for errors)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    assert "error" not in reply, reply["error"]
                    return reply["result"]
                if reply.get("method") == "Runtime.exceptionThrown":
                    self.errors.append(reply["params"]["exceptionDetails"])
                if reply.get("method") == "Runtime.consoleAPICalled" and reply["params"]["type"] in ("error", "assert"):
                    self.errors.append(reply["params"]["args"])
            ready, _, _ = select.select([self._in], [], [], max(deadline - time.monotonic(), 0))
            assert ready, f"chromium did not answer {method}"
            chunk = os.read(self._in, 1 << 20)
            assert chunk, "chromium closed the pipe"
            self._buffer += chunk

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (exceptions fail the test)."""
        result = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Load ``url`` and wait until the dashboard's script finished (``data-ready``)."""
        self.call("Page.navigate", session=self.session, url=url)
        deadline = time.monotonic() + 60
        ready = "[document.readyState, document.documentElement?.getAttribute('data-ready'), location.pathname]"
        errors = "document.documentElement?.getAttribute('data-errors')"
        while self.js(ready) != ["complete", "1", urllib.parse.urlsplit(url).path]:
            assert self.js(errors) is None, self.js(errors)
            assert time.monotonic() < deadline, "the page never became ready"
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        finally:
            self.process.wait(timeout=30)
            os.close(self._out)
            os.close(self._in)


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    b = Browser(tmp_path)
    yield b
    b.close()


ROWS = "[...document.querySelectorAll('tr.row')].map((r) => Number(r.dataset.id))"


def test_sort_filter_page_and_select(tmp_path, browser):
    stats = fixture_stats()
    features = stats["features"]
    browser.open(dashboard(tmp_path, stats).as_uri())
    assert browser.js(ROWS) == list(range(50))
    assert browser.js("document.getElementById('view').dataset.feature") == "0"

    def by(key: str, descending: bool) -> list[int]:
        return [f["id"] for f in sorted(features, key=lambda f: ((-1 if descending else 1) * f[key], f["id"]))]

    for key in ("density", "max", "mean"):  # the first click sorts descending, the second ascending
        browser.js(f"document.querySelector('th[data-key={key}]').click()")
        assert browser.js(ROWS) == by(key, True), key
        browser.js(f"document.querySelector('th[data-key={key}]').click()")
        assert browser.js(ROWS) == by(key, False), key
    browser.js("document.querySelector('th[data-key=id]').click()")
    assert browser.js(ROWS) == list(range(50))

    def filtered(text: str, kind: str = "all") -> list[int]:
        browser.js(f"{{ const f = document.getElementById('filter'); f.value = {json.dumps(text)};"
                   f"document.getElementById('kind').value = {json.dumps(kind)};"
                   "f.dispatchEvent(new Event('input')); }")
        return browser.js(ROWS)

    assert filtered("10-12, 40 7") == [7, 10, 11, 12, 40]
    assert filtered("", "dead") == [3, 9] and filtered("5-30", "dense") == []
    assert filtered("oops") == list(range(50)) and browser.js("document.getElementById('filter').className") == "bad"
    assert filtered("") == list(range(50))

    browser.js("document.querySelector('tr.row[data-id=\"33\"]').click()")  # a row click selects its feature
    assert browser.js("document.getElementById('view').dataset.feature") == "33"
    assert browser.js("location.hash") == "#f=33"
    assert browser.js("document.querySelectorAll('#view .ex').length") == len(features[33]["top"])
    browser.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowDown'}))")
    assert browser.js("document.querySelector('tr.row.sel').dataset.id") == "34"
    browser.js("document.querySelector('#view input[type=checkbox]').click()")  # the histogram's log scale
    assert browser.js("document.querySelector('svg.hist').textContent").endswith("rows (log)")
    assert browser.errors == []


def test_pages_of_ten_thousand(tmp_path, browser):
    stats = fixture_stats(n=10_000, n_top=2, window=6)
    browser.open(dashboard(tmp_path, stats).as_uri())
    assert browser.js(ROWS) == list(range(100))
    browser.js("document.getElementById('next').click()")
    assert browser.js(ROWS) == list(range(100, 200))
    browser.js("document.querySelector('th[data-key=max]').click()")  # sorting keeps the page number
    # the page holds floats to 6 significant digits: features tied there are ordered by id
    order = [f["id"] for f in sorted(stats["features"], key=lambda f: (-float(f"{f['max']:.6g}"), f["id"]))]
    assert browser.js(ROWS) == order[100:200]
    assert browser.js("document.getElementById('range').textContent") == "101–200 of 10000 features"
    assert browser.js("document.getElementById('prev').disabled") is False
    assert browser.js("document.querySelectorAll('.ex').length") == 2  # only the selected feature's examples
    assert browser.errors == []


@needs_chromium
def test_the_dashboard_of_a_real_run(smollm2, tmp_path):
    """`pyinterp features` on SmolLM2 writes features.html beside features.json: it loads without errors and lists
    the features of that file, whose top example's tokens the page shows."""
    from pyinterp.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(line for line in (Path(__file__).parents[1] / "README.md").read_text().splitlines()
                                 if line.strip()) + "\n")
    assert main(["features", str(corpus), "-t", "blocks.5.hook_resid_post", "--context-size", "32", "--max-tokens",
                 "512", "--top-features", "12", "-c", "512", "-o", str(tmp_path / "run")]) == 0
    stats = json.loads((tmp_path / "run" / "features.json").read_text())
    first = stats["features"][0]
    dom, root, console = load((tmp_path / "run" / "features.html").as_uri() + f"#f={first['id']}", tmp_path)
    assert root.get("data-ready") == "1" and "data-errors" not in root and console == []
    parser = Elements("ex")
    parser.feed(dom)
    rows = [int(a["data-id"]) for tag, a in parser.tags if tag == "tr" and "row" in a.get("class", "")]
    assert sorted(rows) == [f["id"] for f in stats["features"]]
    assert len(parser.texts) == len(first["top"]) > 0
