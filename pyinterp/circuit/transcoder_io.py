"""Loading transcoder sets from the layouts the field ships, and saving them in circuit-tracer's.

:func:`load_transcoders` tells the layout from what ``path`` holds (the weight files' facts are in
:mod:`pyinterp.circuit.transcoder_formats`):

1. circuit-tracer: ``config.yaml`` (the directory's, or the file given) with ``feature_input_hook``,
   ``feature_output_hook``, ``model_kind`` (``transcoder_set``, the default, or ``cross_layer_transcoder``),
   optional ``activation`` (``relu``, ``topk`` with ``k``; otherwise JumpReLU where the files hold a threshold)
   and optional ``transcoders``: the layer files in layer order (paths relative to the config; an ``hf://`` URI
   is looked for under the config's directory by its path in the repository, then by its file name; the June
   2025 form, a list of ``{layer, filepath}``, too). Without that list, ``layer_{l}.safetensors`` files (a set)
   or ``W_enc_{l}``/``W_dec_{l}.safetensors`` files (a CLT) next to the config. Layer files may be circuit-tracer's,
   Gemma Scope's ``params.npz`` or Gemma Scope 2's (a CLT's listed files: Gemma Scope 2's CLT layers).
2. SAELens: a transcoder directory (``cfg.json`` + ``sae_weights.safetensors``), or a directory of them; each
   one's layer is the one its hook names give.
3. Gemma Scope / Gemma Scope 2 as published: a directory with ``params.npz`` or ``params.safetensors`` files
   below it (``layer_5/width_16k/average_l0_76/params.npz``, ``transcoder_all/layer_5_width_16k_l0_big/
   params.safetensors``), one per layer, the layer from the first ``layer_<L>`` in its path. The hooks are a
   ``config.json`` beside it (``hf_hook_point_in``, ``hf_hook_point_out``) or the releases' own: Gemma Scope's
   ``ln2.hook_normalized`` -> ``hook_mlp_out``, Gemma Scope 2's ``pre_feedforward_layernorm`` output ->
   ``post_feedforward_layernorm`` output (SAELens's ``_infer_gemma_3_raw_cfg_dict``).

Every layer 0..n-1 must be there once (``n``: ``n_layer``, or the highest layer found + 1), with one d_model
(``d_model``, if given); the input hook must be the MLP input (after the pre-MLP norm, with or without its
weight) and the output the MLP output. Anything else is a one-line :class:`InputError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import yaml

from pyinterp.circuit.transcoder import Transcoder, TranscoderSet
from pyinterp.circuit.transcoder_formats import (hook_meaning, load_clt_layer, load_gemma_scope_clt_layer,
                                                 load_layer_file, load_saelens)
from pyinterp.checks import is_int
from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_write, together
from pyinterp.io.safetensors_io import write_safetensors

CONFIG = "config.yaml"
HOOK_NAMES = {"ffn_norm": "mlp.hook_in", "ffn_norm_unweighted": "ln2.hook_normalized",
              "ffn_term": "hook_mlp_out", "ffn_out": "mlp.hook_out"}  # what save_transcoders writes
_LAYER = re.compile(r"layer_(\d+)")

Found = dict[int, tuple[Transcoder, str]]  # layer -> (transcoder, the file it came from)


def load_transcoders(path: str | os.PathLike, n_layer: int | None = None,
                     d_model: int | None = None) -> TranscoderSet:
    """The transcoder set at ``path`` (see the module docstring for the layouts), checked against the model's
    ``n_layer`` and ``d_model`` where given."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no transcoders at {path}: no such file or directory")
    if path.is_file():
        if path.name == "cfg.json":
            return load_transcoders(path.parent, n_layer, d_model)
        if path.suffix not in (".yaml", ".yml"):
            raise InputError(f"{path}: give a transcoder directory or circuit-tracer's config.yaml")
        return _circuit_tracer(path, n_layer, d_model)
    if (path / CONFIG).is_file():
        return _circuit_tracer(path / CONFIG, n_layer, d_model)
    saelens = [path] if (path / "cfg.json").is_file() else sorted(p.parent for p in path.glob("*/cfg.json"))
    if saelens:
        found, reads, writes = {}, set(), set()
        for directory in saelens:
            tc, r, w = load_saelens(directory)
            _add(found, tc, str(directory))
            reads.add(r)
            writes.add(w)
        if len(reads) > 1 or len(writes) > 1:
            raise InputError(f"{path}: its transcoders read {sorted(reads)} and write {sorted(writes)}; a set reads "
                             f"and writes one kind of tensor")
        return _assemble(found, n_layer, d_model, str(path), reads.pop(), writes.pop())
    if (path / "W_enc_0.safetensors").is_file():
        raise InputError(f"{path}: circuit-tracer CLT files without its {CONFIG} (which names feature_input_hook "
                         f"and feature_output_hook)")
    params = sorted([*path.rglob("params.npz"), *path.rglob("params.safetensors")])
    if params:
        return _gemma_scope(path, params, n_layer, d_model)
    raise InputError(f"{path}: no transcoders in a known layout (circuit-tracer's {CONFIG}, SAELens's cfg.json, "
                     f"Gemma Scope's params.npz or params.safetensors)")


def _add(found: Found, tc: Transcoder, where: str) -> None:
    if tc.layer in found:
        raise InputError(f"two transcoders for layer {tc.layer}: {found[tc.layer][1]} and {where}")
    found[tc.layer] = tc, where


def _assemble(found: Found, n_layer: int | None, d_model: int | None, where: str, reads: str,
              writes: str) -> TranscoderSet:
    """The set of layers 0..n-1 from ``found``, each checked against the model's size."""
    n = n_layer if n_layer is not None else max(found) + 1
    missing = sorted(set(range(n)) - set(found))
    if missing:
        raise InputError(f"{where}: no transcoder for layer{'s' * (len(missing) > 1)} "
                         f"{', '.join(map(str, missing))} (a set covers layers 0..{n - 1})")
    extra = sorted(set(found) - set(range(n)))
    if extra:
        raise InputError(f"{where}: transcoders for layers {extra} of a model of {n} layers ({found[extra[0]][1]})")
    for layer, (tc, source) in sorted(found.items()):
        want = d_model if d_model is not None else found[0][0].d_model
        if tc.d_model != want:
            raise InputError(f"{source}: the transcoder reads {tc.d_model} values per token; "
                             f"{'the model' if d_model is not None else 'layer 0'} has d_model {want}")
    try:
        return TranscoderSet(tuple(tc for _, (tc, _) in sorted(found.items())), reads=reads, writes=writes)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def _read_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not YAML: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a circuit-tracer transcoder config (a YAML mapping)")
    for key in ("feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise InputError(f"{path}: no {key}")
    return config


def _activation(config: dict, where: str) -> tuple[str | None, int | None]:
    """The config's activation (None: from the files) and top-k ``k``."""
    activation, k = config.get("activation"), config.get("k")
    if activation in (None, "jumprelu", "jump_relu"):
        return None, None
    if activation == "relu":
        return "relu", None
    if activation == "topk":
        if not is_int(k) or k < 1:
            raise InputError(f"{where}: activation topk needs a positive integer k, got {k!r}")
        return "topk", int(k)
    raise InputError(f"{where}: activation {activation!r} is not supported (relu, jumprelu, topk)")


def _listed_paths(config: dict, config_path: Path) -> list[tuple[int, Path]] | None:
    """``(layer, file)`` of the config's ``transcoders`` list; None without one."""
    listed = config.get("transcoders")
    if listed is None:
        return None
    if not isinstance(listed, list) or not listed:
        raise InputError(f"{config_path}: transcoders must be a list of layer files")
    out = []
    for i, entry in enumerate(listed):
        layer, name = (entry.get("layer"), entry.get("filepath")) if isinstance(entry, dict) else (i, entry)
        if not is_int(layer) or not isinstance(name, str):
            raise InputError(f"{config_path}: transcoder entry {i} ({entry!r}) names no layer and file")
        out.append((int(layer), _local(name, config_path)))
    return out


def _local(name: str, config_path: Path) -> Path:
    """A config's layer file as a local path: relative to the config, an ``hf://`` URI under its directory."""
    base = config_path.parent
    if not name.startswith("hf://"):
        return base / name
    in_repo = name[len("hf://"):].split("?")[0].split("/", 2)[-1]
    for candidate in (base / in_repo, base / Path(in_repo).name):
        if candidate.is_file():
            return candidate
    raise InputError(f"{config_path}: {name} is not under {base}; pyinterp does not download: fetch it there")


def _circuit_tracer(config_path: Path, n_layer: int | None, d_model: int | None) -> TranscoderSet:
    config = _read_config(config_path)
    where = str(config_path)
    reads = hook_meaning(config["feature_input_hook"], False, where)[0]
    writes = hook_meaning(config["feature_output_hook"], True, where)[0]
    activation, k = _activation(config, where)
    kind = config.get("model_kind", "transcoder_set")
    listed = _listed_paths(config, config_path)
    directory = config_path.parent
    found: Found = {}
    if kind == "transcoder_set":
        if listed is None:
            listed = _numbered(directory, "layer_", where)
        for layer, file in listed:
            _add(found, load_layer_file(_existing(file, where), layer, activation, k), str(file))
    elif kind == "cross_layer_transcoder":
        if listed is None:
            n = len(_numbered(directory, "W_enc_", where))
            for layer in range(n):
                _add(found, load_clt_layer(directory, layer, n, activation, k), str(directory / f"W_enc_{layer}"))
        else:
            for layer, file in listed:
                _add(found, load_gemma_scope_clt_layer(_existing(file, where), layer, len(listed)), str(file))
    else:
        raise InputError(f"{where}: model_kind {kind!r} is not transcoder_set or cross_layer_transcoder")
    return _assemble(found, n_layer, d_model, where, reads, writes)


def _existing(file: Path, where: str) -> Path:
    if not file.is_file():
        raise InputError(f"{where}: its transcoder file {file} does not exist")
    return file


def _numbered(directory: Path, prefix: str, where: str) -> list[tuple[int, Path]]:
    """``(l, file)`` of the ``{prefix}{l}.safetensors`` files in ``directory``, which must be l = 0..n-1."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.safetensors$")
    files = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.match(p.name)))
    if not files:
        raise InputError(f"{where}: no {prefix}<layer>.safetensors files beside it and no transcoders list")
    missing = sorted(set(range(files[-1][0] + 1)) - {layer for layer, _ in files})
    if missing:
        raise InputError(f"{where}: no {', '.join(f'{prefix}{m}.safetensors' for m in missing)} in {directory}")
    return files


def _gemma_scope(root: Path, params: list[Path], n_layer: int | None, d_model: int | None) -> TranscoderSet:
    found: Found = {}
    kinds = set()
    for file in params:
        m = _LAYER.search(str(file.relative_to(root)))
        if m is None:
            raise InputError(f"{file}: no layer_<L> in its path below {root}, so its layer is unknown")
        npz = file.suffix == ".npz"
        hooks = ("ln2.hook_normalized", "hook_mlp_out") if npz else (
            "pre_feedforward_layernorm.output", "post_feedforward_layernorm.output")
        if (file.parent / "config.json").is_file():
            hooks = _gemma_scope_hooks(file.parent / "config.json", hooks)
        kinds.add((hook_meaning(hooks[0], False, str(file))[0], hook_meaning(hooks[1], True, str(file))[0]))
        _add(found, load_layer_file(file, int(m.group(1)), None, None), str(file))
    if len(kinds) > 1:
        raise InputError(f"{root}: its transcoders read and write different tensors {sorted(kinds)}")
    reads, writes = kinds.pop()
    return _assemble(found, n_layer, d_model, str(root), reads, writes)


def _gemma_scope_hooks(path: Path, default: tuple[str, str]) -> tuple[str, str]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object")
    return config.get("hf_hook_point_in", default[0]), config.get("hf_hook_point_out", default[1])


def save_transcoders(ts: TranscoderSet, path: str | os.PathLike, dtype: str = "F32", model_name: str = "") -> Path:
    """Write ``ts`` to the directory ``path`` in circuit-tracer's layout (``config.yaml`` and
    ``layer_{l}.safetensors``, or a CLT's ``W_enc_{l}``/``W_dec_{l}.safetensors``), all files or none; weights as
    ``dtype`` (F32, F16, BF16). A skip CLT's ``W_skip_{l}`` and a top-k CLT's ``activation: topk`` are pyinterp's
    additions, which circuit-tracer's loader ignores. ``path`` must be new or hold only these files."""
    path = Path(path)
    activations = {tc.activation for tc in ts.layers}
    ks = {tc.k for tc in ts.layers}
    if "topk" in activations and (len(activations) > 1 or len(ks) > 1):
        raise InputError("circuit-tracer's config gives one k for all layers: a top-k set must be top-k with one k")
    if ts.cross_layer and len(activations) > 1:
        raise InputError("a CLT's layers must share one activation in circuit-tracer's layout")
    config = {"model_name": model_name, "model_kind": "cross_layer_transcoder" if ts.cross_layer else "transcoder_set",
              "feature_input_hook": HOOK_NAMES[ts.reads], "feature_output_hook": HOOK_NAMES[ts.writes]}
    if "topk" in activations:
        config.update(activation="topk", k=int(ks.pop()))
    files = {CONFIG: None}
    for tc in ts.layers:
        files.update(_clt_files(tc) if ts.cross_layer else _layer_files(tc))
    try:
        path.mkdir(parents=True, exist_ok=True)
        others = sorted(p.name for p in path.iterdir() if p.name not in files)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    if others:
        raise InputError(f"{path} holds other files ({', '.join(others[:3])}); save transcoders to a new directory")
    with together():
        for name, tensors in files.items():
            if tensors is not None:
                write_safetensors(path / name, tensors, dtype)
        try:
            with atomic_write(path / CONFIG, "w") as f:
                yaml.safe_dump(config, f, sort_keys=False)
        except OSError as e:
            raise InputError(f"cannot write {path / CONFIG}: {e.strerror or e}") from None
    return path


def _layer_files(tc: Transcoder) -> dict[str, dict[str, np.ndarray]]:
    t = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
    if tc.threshold is not None:
        t["activation_function.threshold"] = tc.threshold
    if tc.W_skip is not None:
        t["W_skip"] = tc.W_skip.T
    return {f"layer_{tc.layer}.safetensors": t}


def _clt_files(tc: Transcoder) -> dict[str, dict[str, np.ndarray]]:
    l = tc.layer  # noqa: E741
    enc = {f"W_enc_{l}": tc.W_enc.T, f"b_enc_{l}": tc.b_enc, f"b_dec_{l}": tc.b_dec}
    if tc.threshold is not None:
        enc[f"threshold_{l}"] = tc.threshold
    if tc.W_skip is not None:
        enc[f"W_skip_{l}"] = tc.W_skip
    return {f"W_enc_{l}.safetensors": enc, f"W_dec_{l}.safetensors": {f"W_dec_{l}": tc.W_dec.transpose(1, 0, 2)}}
