"""Interventions inside the graph on a remote ggml backend: a ggml RPC server on loopback holds the
layers, the KV cache and pyinterp's head masks and patch rows, and computes everything; the results
must be those of the local CPU. Needs a build with -DGGML_RPC=ON, which .ci/run makes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import pyinterp

pytestmark = pytest.mark.skipif("rpc" not in pyinterp.build_info()["backends"],
                                reason="pyinterp built without -DGGML_RPC=ON (.ci/run builds it)")

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "pyinterp.engine.rpc", address, "-t", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                time.sleep(0.1)
        yield address
    finally:
        server.kill()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def remote(endpoint):
    with pyinterp.Model("smollm2", n_ctx=512, n_gpu_layers=-1, rpc=endpoint) as model:
        yield model


def close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, atol=2e-3 * max(1.0, float(np.abs(b).max())))


def test_layers_live_on_the_server(remote, smollm2):
    assert [remote.layer_device(il) for il in range(-1, remote.n_layer)] == ["RPC0"] * (remote.n_layer + 1)
    assert smollm2.layer_device(0) == "CPU"


def test_interventions_match_the_cpu(remote, smollm2):
    row = smollm2.run(PROMPT, capture=["l_out-6"])["l_out", 6][3]
    cases = [dict(), dict(ablate=[(3, 4), (10, 0)]), dict(isolate=(5, 2)), dict(patch=[("l_out", 6, 9, row)])]
    for kwargs in cases:
        close(remote.run(PROMPT, **kwargs).logits, smollm2.run(PROMPT, **kwargs).logits)
    base = smollm2.run(PROMPT).logits
    assert not np.allclose(remote.run(PROMPT, isolate=(5, 2)).logits, base, atol=1e-2)


def test_batched_sweep_matches_the_cpu(remote, smollm2):
    """Variants from their own first positions, layers skipped (no-op nodes) on the server."""
    from pyinterp.analysis.patching import logit_diff, patch_sweep

    clean, corrupt = "The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"
    metric = logit_diff(" Paris", " Rome")
    got = patch_sweep(remote, clean, corrupt, metric=metric, layers=[0, 8, 20])
    want = patch_sweep(smollm2, clean, corrupt, metric=metric, layers=[0, 8, 20])
    assert remote.engine.backend.n_skipped() > 0
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
    assert np.abs(got - want).max() <= 1.0


def test_captures_and_lens_match_the_cpu(remote, smollm2):
    names = ["attn_scores-7", "l_out-7", "kqv_heads-7"]
    got = remote.run(PROMPT, capture=names, ablate=[(7, 1)])
    want = smollm2.run(PROMPT, capture=names, ablate=[(7, 1)])
    for name in names:
        close(got[name], want[name])
    assert np.all(got.attention(7)[1] == 0)
    lens, local = remote.logit_lens(PROMPT, top_k=3), smollm2.logit_lens(PROMPT, top_k=3)
    assert np.mean(lens.ids[:, :, 0] == local.ids[:, :, 0]) > 0.95
    np.testing.assert_allclose(lens.probs, local.probs, atol=1e-2)


def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(pyinterp.PyinterpError, match="cannot reach the RPC server"):
        pyinterp.Model("smollm2", rpc=f"127.0.0.1:{port}")
    with pytest.raises(pyinterp.InputError, match="host:port"):
        pyinterp.Model("smollm2", rpc="nowhere")


def test_cli_rpc(capsys, endpoint):
    import json

    from pyinterp.cli import main

    args = ["-c", "512", "-p", PROMPT, "-a", "3:4", "--json"]
    assert main([*args, "--rpc", endpoint, "--n-gpu-layers", "-1"]) == 0
    remote = json.loads(capsys.readouterr().out)["next_token"]
    assert main(args) == 0
    local = json.loads(capsys.readouterr().out)["next_token"]
    assert [t["id"] for t in remote] == [t["id"] for t in local]
    assert remote[0]["p"] == pytest.approx(local[0]["p"], abs=2e-3)
