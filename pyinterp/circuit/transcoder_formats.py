"""The weights and hook names of the transcoder files the field ships, read into :class:`Transcoder` layers.

Facts (read from the producers' code; orientations are the files', ``pyinterp`` keeps ``x @ W_enc``):

- SAELens 6.x (``sae_lens/saes/transcoder.py``, ``sae_lens/loading/pretrained_sae_loaders.py``, v6.54): a
  directory with ``cfg.json`` (``architecture`` transcoder, skip_transcoder, jumprelu_transcoder or
  jumprelu_skip_transcoder; ``d_in``, ``d_sae``, ``d_out``, ``apply_b_dec_to_input`` false,
  ``normalize_activations`` and ``reshape_activations`` "none"; ``metadata`` with ``hook_name``,
  ``hook_name_out`` and, in configs converted from Gemma Scope 2, ``hf_hook_name``/``hf_hook_name_out``) and
  ``sae_weights.safetensors``: ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``,
  ``threshold [d_sae]`` (JumpReLU), ``W_skip [d_out, d_in]`` applied as ``x @ W_skip.T``.
- circuit-tracer per-layer files (``circuit_tracer/transcoder/single_layer_transcoder.py``): ``W_enc [d_tc,
  d_model]`` (``F.linear``), ``W_dec [d_tc, d_model]`` (its June 2025 loader read ``[d_model, d_tc]`` files:
  told apart by shape), ``b_enc``, ``b_dec``, ``activation_function.threshold`` (JumpReLU), ``W_skip [d_model,
  d_model]`` applied as ``x @ W_skip.T``.
- circuit-tracer CLT (``cross_layer_transcoder.py``): ``W_enc_{l}.safetensors`` with ``W_enc_{l} [d_tc,
  d_model]``, ``b_enc_{l}``, ``b_dec_{l}``, ``threshold_{l}``; ``W_dec_{l}.safetensors`` with ``W_dec_{l} [d_tc,
  n_layer - l, d_model]``. Its files hold no skip weights; pyinterp adds ``W_skip_{l} [d_model, d_model]``
  (applied as ``x @ W_skip``, the CLT module's orientation) to ``W_enc_{l}.safetensors`` when there is one.
- Gemma Scope (Gemma 2) ``params.npz``: ``W_enc [d_model, d_tc]``, ``W_dec [d_tc, d_model]``, ``b_enc``,
  ``b_dec``, ``threshold``. Gemma Scope 2 ``params.safetensors``: ``w_enc [d_model, d_tc]``, ``w_dec [d_tc,
  d_model]`` (a CLT layer's: ``[d_tc, n_layer, d_model]``, of which the layers from its own on are used),
  ``b_enc``, ``b_dec``, ``threshold``, ``affine_skip_connection [d_model, d_model]`` applied as ``x @ A``.

JumpReLU is ``relu(pre) * (pre > threshold)`` in SAELens and pyinterp, ``pre * (pre > threshold)`` in
circuit-tracer: the same for thresholds >= 0, so negative thresholds in circuit-tracer's layouts are refused.
circuit-tracer's TopK keeps the k largest pre-activations without a ReLU; pyinterp's zeroes negative ones (the
same unless fewer than k are positive).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from pyinterp.circuit.transcoder import Transcoder
from pyinterp.errors import InputError
from pyinterp.io.safetensors_io import read_safetensors

# hook names (after any layer prefix) -> what they mean (see pyinterp/circuit/transcoder.py)
INPUT_HOOKS = {
    "mlp.hook_in": "ffn_norm",                        # TransformerLens (circuit-tracer's MLP wrapper, SAELens)
    "ln2.hook_normalized": "ffn_norm_unweighted",     # TransformerLens: x / rms, before the norm weight
    "pre_feedforward_layernorm.output": "ffn_norm",   # HF Gemma 2/3
    "mlp.input": "ffn_norm",                          # HF
    "ffn_norm": "ffn_norm",                           # llama.cpp
}
OUTPUT_HOOKS = {
    "hook_mlp_out": "ffn_term", "mlp.hook_out": "ffn_out",
    "post_feedforward_layernorm.output": "ffn_term", "mlp.output": "ffn_out",
    "ffn_post_norm": "ffn_term", "ffn_out": "ffn_out",
}
REFUSED = {
    "hook_resid_mid": "the residual stream before the pre-MLP norm",
    "hook_mlp_in": "TransformerLens's copy of the residual stream before the pre-MLP norm",
    "ffn_inp": "the residual stream before the pre-MLP norm",
    "post_attention_layernorm.output": "the MLP input on llama but the attention output's norm on Gemma",
}
_LAYERED = (re.compile(r"^blocks\.(\d+)\.(.+)$"), re.compile(r"^(?:model\.)?(?:language_model\.)?layers\.(\d+)\.(.+)$"))
_LLAMA_CPP = re.compile(r"^([a-z_]+)-(\d+)$")


def hook_meaning(hook: object, output: bool, where: str) -> tuple[str, int | None]:
    """What a transcoder's input (``output`` False) or output hook name means, and the layer it names (None: no
    layer in the name, as circuit-tracer's configs give them)."""
    if not isinstance(hook, str):
        raise InputError(f"{where}: the {'output' if output else 'input'} hook must be a name, got {hook!r}")
    layer, name = _split(hook)
    table = OUTPUT_HOOKS if output else INPUT_HOOKS
    if name in table:
        return table[name], layer
    side = "output" if output else "input"
    why = f" ({REFUSED[name]})" if name in REFUSED else ""
    want = "MLP output" if output else "MLP input (after the pre-MLP norm)"
    raise InputError(f"{where}: {side} hook {hook!r}{why} is not a transcoder's {want}; pyinterp reads "
                     f"{', '.join(sorted(table))}")


def make_layer(where: str, layer: int, **arrays) -> Transcoder:
    """A :class:`Transcoder`, its shape and value errors prefixed with the file they come from."""
    try:
        return Transcoder(layer, **arrays)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors or ``.npz`` file's arrays as float32 (integers as stored)."""
    if path.suffix != ".npz":
        return read_safetensors(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read {path} as a numpy .npz file: {e}") from None
    for k, v in out.items():
        if v.dtype.kind != "f":
            raise InputError(f"{path}: array {k!r} is {v.dtype}, not floating point")
    return {k: v.astype(np.float32) for k, v in out.items()}


def need(tensors: dict[str, np.ndarray], names: tuple[str, ...], where: str) -> list[np.ndarray]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise InputError(f"{where}: no tensor {', '.join(missing)} (it holds {', '.join(sorted(tensors)) or 'none'})")
    return [tensors[n] for n in names]


def _nonnegative(threshold: np.ndarray | None, where: str) -> np.ndarray | None:
    if threshold is not None and np.any(threshold < 0):
        raise InputError(f"{where}: negative JumpReLU thresholds; circuit-tracer's pre * (pre > t) and "
                         f"pyinterp's relu(pre) * (pre > t) differ there")
    return threshold


def _matrix(a: np.ndarray, name: str, where: str) -> np.ndarray:
    if a.ndim != 2:
        raise InputError(f"{where}: {name} must be a matrix, got shape {list(a.shape)}")
    return a


# SAELens

SAELENS_ARCHS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
                 "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}


def saelens_hooks(cfg: dict, where: str) -> tuple[str, str, int]:
    """``(reads, writes, layer)`` of a SAELens transcoder cfg; HF hook names, where given, win over the
    TransformerLens ones (SAELens names Gemma Scope 2's MLP input ``hook_mlp_in``, which TransformerLens puts
    before the norm, with ``hf_hook_name`` = ``pre_feedforward_layernorm.output``)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    get = lambda key: meta.get(key, cfg.get(key))  # noqa: E731 - the 6.x layout nests them in metadata
    if get("hook_head_index") is not None or get("hook_head_index_out") is not None:
        raise InputError(f"{where}: a transcoder of one attention head (hook_head_index) is not an MLP's")
    sides = []
    for output, keys in ((False, ("hf_hook_name", "hook_name")), (True, ("hf_hook_name_out", "hook_name_out"))):
        names = [get(k) for k in keys if get(k) is not None]
        if not names:
            raise InputError(f"{where}: no {keys[1]} (a transcoder's {'output' if output else 'input'} hook)")
        sides.append(hook_meaning(names[0], output, where)[0])
    names = [get(k) for k in ("hook_name", "hook_name_out", "hf_hook_name", "hf_hook_name_out")]
    layers = {_split(n)[0] for n in names if isinstance(n, str)} - {None}
    if len(layers) != 1:
        raise InputError(f"{where}: the hook names give layers {sorted(layers) or 'none'}; a transcoder reads and "
                         f"writes one layer's MLP")
    return sides[0], sides[1], layers.pop()


def _split(hook: str) -> tuple[int | None, str]:
    """``(layer, name within the layer)`` of a TransformerLens, HF or llama.cpp hook name."""
    for pattern in _LAYERED:
        if m := pattern.match(hook):
            return int(m.group(1)), m.group(2)
    if m := _LLAMA_CPP.match(hook):
        return int(m.group(2)), m.group(1)
    return None, hook


def load_saelens(directory: Path) -> tuple[Transcoder, str, str]:
    """One SAELens transcoder directory as ``(transcoder, reads, writes)``."""
    cfg_path = directory / "cfg.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except OSError as e:
        raise InputError(f"cannot read {cfg_path}: {e.strerror or e}") from None
    except ValueError as e:
        raise InputError(f"{cfg_path} is not JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("architecture") not in SAELENS_ARCHS:
        arch = cfg.get("architecture") if isinstance(cfg, dict) else None
        raise InputError(f"{cfg_path}: architecture {arch!r} is not a SAELens transcoder "
                         f"({', '.join(SAELENS_ARCHS)})")
    for key, want in (("apply_b_dec_to_input", False), ("normalize_activations", "none"),
                      ("reshape_activations", "none")):
        if cfg.get(key, want) != want:
            raise InputError(f"{cfg_path}: {key} {cfg[key]!r} is not supported (pyinterp reads {want!r})")
    reads, writes, layer = saelens_hooks(cfg, str(cfg_path))
    activation, skip = SAELENS_ARCHS[cfg["architecture"]]
    weights = directory / "sae_weights.safetensors"
    t = read_safetensors(weights)
    W_enc, b_enc, W_dec, b_dec = need(t, ("W_enc", "b_enc", "W_dec", "b_dec"), str(weights))
    threshold = need(t, ("threshold",), str(weights))[0] if activation == "jumprelu" else None
    W_skip = _matrix(need(t, ("W_skip",), str(weights))[0], "W_skip", str(weights)).T if skip else None
    for key in ("d_in", "d_sae", "d_out"):
        shape = {"d_in": W_enc.shape[:1], "d_sae": b_enc.shape, "d_out": b_dec.shape}[key]
        if key in cfg and (cfg[key],) != tuple(shape):
            raise InputError(f"{weights}: {key} is {cfg[key]} in cfg.json but the weights give {list(shape)}")
    tc = make_layer(str(weights), layer, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                    activation=activation, threshold=threshold, W_skip=W_skip)
    return tc, reads, writes


# circuit-tracer and Gemma Scope files


def load_layer_file(path: Path, layer: int, activation: str | None, k: int | None) -> Transcoder:
    """One per-layer transcoder file of circuit-tracer or Gemma Scope (1: ``.npz``, 2: lower-case names)."""
    where = str(path)
    t = read_tensors(path)
    if "w_enc" in t or path.suffix == ".npz":  # Gemma Scope: encoder [d_model, d_tc], x @ A skip
        names = ("w_enc", "b_enc", "w_dec", "b_dec", "threshold") if "w_enc" in t else \
            ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        W_enc, b_enc, W_dec, b_dec, threshold = need(t, names, where)
        if W_dec.ndim == 3:
            raise InputError(f"{where}: a cross-layer transcoder's layer file (w_dec {list(W_dec.shape)}); give its "
                             f"config.yaml with model_kind: cross_layer_transcoder")
        return make_layer(where, layer, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation="jumprelu",
                          threshold=_nonnegative(threshold, where), W_skip=t.get("affine_skip_connection"))
    W_enc, b_enc, W_dec, b_dec = need(t, ("W_enc", "b_enc", "W_dec", "b_dec"), where)
    W_enc, W_dec = _matrix(W_enc, "W_enc", where), _matrix(W_dec, "W_dec", where)
    if W_dec.shape[0] != b_enc.shape[0] and W_dec.T.shape == (b_enc.shape[0], b_dec.shape[0]):
        W_dec = W_dec.T  # the June 2025 layout
    threshold = t.get("activation_function.threshold")
    if activation is None:
        activation = "jumprelu" if threshold is not None else "relu"
    if activation != "jumprelu" and threshold is not None:
        raise InputError(f"{where}: a JumpReLU threshold in a transcoder the config calls {activation}")
    W_skip = t.get("W_skip")
    return make_layer(where, layer, W_enc=W_enc.T, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation=activation,
                      threshold=_nonnegative(threshold, where), k=k,
                      W_skip=None if W_skip is None else _matrix(W_skip, "W_skip", where).T)


def load_clt_layer(directory: Path, layer: int, n_layer: int, activation: str | None, k: int | None) -> Transcoder:
    """Layer ``layer`` of circuit-tracer's CLT directory (``W_enc_{l}`` and ``W_dec_{l}`` files)."""
    enc, dec = directory / f"W_enc_{layer}.safetensors", directory / f"W_dec_{layer}.safetensors"
    t = read_tensors(enc)
    W_enc, b_enc, b_dec = need(t, (f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}"), str(enc))
    threshold = t.get(f"threshold_{layer}")
    if activation is None:
        activation = "jumprelu" if threshold is not None else "relu"
    (W_dec,) = need(read_tensors(dec), (f"W_dec_{layer}",), str(dec))
    if W_dec.ndim != 3 or W_dec.shape[1] != n_layer - layer:
        raise InputError(f"{dec}: W_dec_{layer} must be [d_tc, {n_layer - layer}, d_model] (a CLT of {n_layer} "
                         f"layers), got {list(W_dec.shape)}")
    return make_layer(str(enc), layer, W_enc=_matrix(W_enc, f"W_enc_{layer}", str(enc)).T, b_enc=b_enc,
                      W_dec=W_dec.transpose(1, 0, 2), b_dec=b_dec, activation=activation,
                      threshold=_nonnegative(threshold, str(enc)), k=k, W_skip=t.get(f"W_skip_{layer}"))


def load_gemma_scope_clt_layer(path: Path, layer: int, n_layer: int) -> Transcoder:
    """Layer ``layer`` of a Gemma Scope 2 CLT: a per-layer file whose ``w_dec`` is ``[d_tc, n_layer, d_model]``."""
    where = str(path)
    t = read_tensors(path)
    W_enc, b_enc, W_dec, b_dec, threshold = need(t, ("w_enc", "b_enc", "w_dec", "b_dec", "threshold"), where)
    if W_dec.ndim != 3 or W_dec.shape[1] != n_layer:
        raise InputError(f"{where}: w_dec must be [d_tc, {n_layer}, d_model] (a CLT of {n_layer} layers), got "
                         f"{list(W_dec.shape)}")
    return make_layer(where, layer, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec[:, layer:].transpose(1, 0, 2),
                      b_dec=b_dec, activation="jumprelu", threshold=_nonnegative(threshold, where),
                      W_skip=t.get("affine_skip_connection"))
