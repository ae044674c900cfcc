"""Sparse autoencoders in SAELens's on-disk format: loading, saving, the encode/decode equations (numpy), and
the features of a prompt's activations.

The facts of the format and of the equations are SAELens's (``sae_lens/saes/{sae,standard_sae,jumprelu_sae,
topk_sae}.py``, ``sae_lens/loading/pretrained_sae_loaders.py``, v6.18; the pre-6.0 ``sae_lens/sae.py``):

- a directory with ``cfg.json`` and ``sae_weights.safetensors``. The weights are ``W_enc [d_in, d_sae]``,
  ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for JumpReLU, ``threshold [d_sae]``; a
  ``scaling_factor [d_sae]`` of all ones (older files) is dropped, as SAELens does;
- cfg.json, 6.x layout (``metadata.sae_lens_version`` >= 6): ``architecture``, ``d_in``, ``d_sae``, ``dtype``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations`` (``"hook_z"``: the input is
  TransformerLens's ``[n_head, d_head]`` per token, flattened head-major), TopK's ``k`` and
  ``rescale_acts_by_decoder_norm``, and ``metadata`` with ``hook_name``, ``hook_head_index``, ``model_name``;
- cfg.json before 6.0 (no version, or < 6): the same keys at the top level (``hook_point`` and
  ``activation_fn`` are older names of ``hook_name`` and ``activation_fn_str``), ``architecture`` defaulting
  to ``"standard"``; ``activation_fn_str`` ``"topk"`` with ``activation_fn_kwargs.k`` makes it a TopK SAE;
  ``normalize_activations`` may be a bool (true: ``"expected_average_only_in"``); ``reshape_activations``
  defaults to ``"hook_z"`` when the hook name contains ``hook_z``;
- the equations, per token row ``x [d_in]``::

      pre   = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc                  [d_sae]
      standard: f = relu(pre)
      jumprelu: f = relu(pre) * (pre > threshold)
      topk:     f = relu(pre) on the k largest entries of pre, 0 elsewhere
      x_hat = f @ W_dec + b_dec                                                    [d_in]

  TopK with ``rescale_acts_by_decoder_norm`` multiplies ``pre`` by each feature's decoder row norm and divides
  ``f`` by it before decoding; :meth:`SAE.load` folds that into the weights as SAELens's ``_fold_norm_topk``
  does (``W_enc`` columns and ``b_enc`` times the norm, ``W_dec`` rows divided by it), which leaves the
  equations above.

Not supported (a one-line error): other architectures (gated, transcoders), ``normalize_activations`` other
than ``"none"``, an SAE of one attention head (``hook_head_index``), pre-6.0 activation functions other than
relu and topk, and a finetuning ``scaling_factor`` other than ones. pyinterp computes in float32 whatever the
stored dtype (F32, F16 or BF16 weights widen exactly); SAELens computes in the cfg's dtype.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pyinterp.checks import is_int
from pyinterp.engine.readouts import SAEReadout, upload_sae
from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_write, together
from pyinterp.io.safetensors_io import read_safetensors, rounded, write_safetensors

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike

ARCHITECTURES = ("standard", "jumprelu", "topk")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# cfg.json dtype (SAELens writes "float32" or "torch.float32") -> safetensors dtype
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True, eq=False)
class SAE:
    """A sparse autoencoder of one hook point; arrays are float32 (see the module docstring for the equations).

    ``hook_name`` is a TransformerLens hook name (``blocks.5.hook_resid_post``) or a pyinterp tensor name
    (``l_out-5``); ``hook_z``: the input is the per-head attention output flattened to ``[n_head * d_head]``.
    ``dtype`` is the weights' type on disk (``float32``, ``float16`` or ``bfloat16``), kept by :meth:`save`.
    """

    W_enc: np.ndarray                     # [d_in, d_sae]
    b_enc: np.ndarray                     # [d_sae]
    W_dec: np.ndarray                     # [d_sae, d_in]
    b_dec: np.ndarray                     # [d_in]
    hook_name: str
    architecture: str = "standard"
    threshold: np.ndarray | None = None   # [d_sae], jumprelu only
    k: int | None = None                  # topk only: features kept per token
    apply_b_dec_to_input: bool = True
    hook_z: bool = False
    dtype: str = "float32"
    model_name: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"SAE architecture {self.architecture!r} is not supported; pyinterp implements "
                             f"{', '.join(ARCHITECTURES)}")
        if self.dtype not in DTYPES:
            raise InputError(f"SAE dtype {self.dtype!r} is not supported; pyinterp reads {', '.join(DTYPES)}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.ascontiguousarray(value, dtype=np.float32))
        d_in, d_sae = self.W_enc.shape if self.W_enc.ndim == 2 else (-1, -1)
        want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.architecture == "jumprelu":
            want["threshold"] = (d_sae,)
        elif self.threshold is not None:
            raise InputError(f"a {self.architecture} SAE has no threshold (JumpReLU's)")
        for name, shape in want.items():
            value = getattr(self, name)
            if value is None or value.shape != shape or d_in < 1:
                raise InputError(f"SAE {name} must be {list(shape)} (W_enc is [d_in, d_sae]), got "
                                 f"{None if value is None else list(value.shape)}")
        for name in want:
            if not np.all(np.isfinite(getattr(self, name))):
                raise InputError(f"SAE {name} has NaN or infinite values")
        if self.architecture == "topk":
            if not is_int(self.k) or not 1 <= self.k <= d_sae:
                raise InputError(f"a topk SAE needs k in 1..d_sae ({d_sae}), got {self.k!r}")
            object.__setattr__(self, "k", int(self.k))
        elif self.k is not None:
            raise InputError(f"k is the number of features a topk SAE keeps; this SAE is {self.architecture}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    # the equations

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Feature activations ``[n_tokens, d_sae]`` of activations ``x`` ``[n_tokens, d_in]``."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise InputError(f"SAE input must be [n_tokens, {self.d_in}], got {list(x.shape)}")
        pre = (x - self.b_dec * np.float32(self.apply_b_dec_to_input)) @ self.W_enc + self.b_enc
        if self.architecture == "standard":
            return np.maximum(pre, 0)
        if self.architecture == "jumprelu":
            return np.maximum(pre, 0) * (pre > self.threshold)
        top = np.argpartition(-pre, self.k - 1, axis=1)[:, :self.k]
        f = np.zeros_like(pre)
        np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
        return f

    def decode(self, f: np.ndarray) -> np.ndarray:
        """Reconstruction ``[n_tokens, d_in]`` of feature activations ``f`` ``[n_tokens, d_sae]``."""
        f = np.asarray(f, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.d_sae:
            raise InputError(f"SAE features must be [n_tokens, {self.d_sae}], got {list(f.shape)}")
        return f @ self.W_dec + self.b_dec

    # where it reads

    def hook_tensor(self, model: ModelLike) -> tuple[str, int]:
        """The ``(name, layer)`` of the model's tensor the SAE reads (layer -1: outside the layers), via the
        model's TransformerLens alias table (pyinterp/engine/arch.py); ``blocks.L.hook_resid_pre`` is the residual
        entering layer L, ``l_out-(L-1)`` (``hook_embed`` for L = 0). The tensor's rows must have ``d_in``
        values (``[n_tokens, d_in]``, or ``[n_tokens, n_head, d_head]`` for a hook_z SAE)."""
        try:
            found = model.engine.planner().captures([self.hook_name])  # aliases resolved there, resid_pre too
        except InputError as e:
            raise InputError(f"SAE hook {self.hook_name!r}: {e}") from None
        if len(found) != 1:
            raise InputError(f"SAE hook {self.hook_name!r} names {len(found)} tensors; give one layer, like 'l_out-5'")
        name, layer = found[0]
        label = name if layer < 0 else f"{name}-{layer}"
        shape = model.tensor_info().shapes[name][:-1]  # ggml ne without the token axis, innermost first
        if len(shape) == 1 or (len(shape) == 2 and self.hook_z):
            width = int(np.prod(shape))
        else:
            raise InputError(f"SAE hook {self.hook_name!r}: {label} is not a [n_tokens, width] tensor (rows of "
                             f"shape {list(reversed(shape))}); only hook_z SAEs flatten [n_head, d_head] rows")
        if width != self.d_in:
            raise InputError(f"SAE hook {self.hook_name!r}: the SAE reads {self.d_in} values per token but {label}'s "
                             f"rows have {width}; is it this model's SAE?")
        return name, layer

    # files

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SAE":
        """An SAE from a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``), either cfg layout."""
        path = Path(path)
        try:
            raw = json.loads((path / CFG_FILE).read_text())
        except OSError as e:
            raise InputError(f"cannot read {path / CFG_FILE}: {e.strerror or e} (an SAE is a SAELens directory "
                             f"with {CFG_FILE} and {WEIGHTS_FILE})") from None
        except ValueError as e:
            raise InputError(f"{path / CFG_FILE} is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path / CFG_FILE} is not a JSON object")
        settings = _settings(raw, path / CFG_FILE)
        tensors = read_safetensors(path / WEIGHTS_FILE)
        return _from_parts(settings, tensors, path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the SAE as a SAELens directory (created if needed): the 6.x cfg layout, with ``hook_name`` and
        ``model_name`` also at the top level where SAELens looks for them in a cfg without a version (it reads
        this one as pre-6.0), and the weights in ``dtype``."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create {path}: {e.strerror or e}") from None
        cfg: dict[str, object] = {
            "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype,
            "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
            "reshape_activations": "hook_z" if self.hook_z else "none", "hook_name": self.hook_name,
            "model_name": self.model_name, "metadata": {"hook_name": self.hook_name, "model_name": self.model_name},
        }
        if self.architecture == "topk":
            cfg.update(k=self.k, rescale_acts_by_decoder_norm=False)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        with together():  # both files or neither
            write_safetensors(path / WEIGHTS_FILE, tensors, DTYPES[self.dtype])
            try:
                with atomic_write(path / CFG_FILE, "w", encoding="utf-8") as f:
                    f.write(json.dumps(cfg, indent=2))
            except OSError as e:
                raise InputError(f"cannot write {path / CFG_FILE}: {e.strerror or e}") from None
        return path


def _pre_6(raw: dict) -> bool:
    """Whether SAELens reads this cfg with its pre-6.0 conversion: no ``sae_lens_version`` (top level or in
    ``metadata``), or one below 6."""
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    version = raw.get("sae_lens_version") or metadata.get("sae_lens_version")
    m = re.match(r"\d+", str(version or ""))
    return m is None or int(m.group()) < 6


def _settings(raw: dict, where: Path) -> dict:
    """The SAE's settings from cfg.json in either layout; a one-line error for what pyinterp does not implement."""
    if _pre_6(raw):
        renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                   "activation_fn_str": "activation_fn"}
        cfg = {renames.get(key, key): value for key, value in raw.items()}
        meta = cfg
        architecture = cfg.get("architecture", "standard")
        activation = cfg.get("activation_fn", "relu")
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if activation == "topk" and kwargs.get("k") is not None:
            architecture = "topk"
        if architecture == "topk" and "k" in kwargs:
            cfg["k"] = kwargs["k"]
        if activation not in ("relu", "topk") or (activation == "topk" and architecture != "topk"):
            raise InputError(f"{where}: activation function {activation!r} is not supported; pyinterp implements "
                             f"relu and topk (with activation_fn_kwargs.k)")
        norm = cfg.get("normalize_activations")
        if norm is None or isinstance(norm, bool):
            norm = "expected_average_only_in" if norm else "none"
        hook_z = cfg.get("reshape_activations", "hook_z" if "hook_z" in str(cfg.get("hook_name", "")) else "none")
    else:
        cfg = raw
        meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
        architecture = cfg.get("architecture")
        norm = cfg.get("normalize_activations", "none")
        hook_z = cfg.get("reshape_activations", "none")
    if architecture not in ARCHITECTURES:
        raise InputError(f"{where}: SAE architecture {architecture!r} is not supported; pyinterp implements "
                         f"{', '.join(ARCHITECTURES)}")
    if norm != "none":
        raise InputError(f"{where}: normalize_activations {norm!r} is not supported (only 'none': the input "
                         f"normalization is not part of the weights)")
    if meta.get("hook_head_index") is not None:
        raise InputError(f"{where}: an SAE of one attention head (hook_head_index {meta['hook_head_index']}) "
                         f"is not supported")
    if hook_z not in ("none", "hook_z"):
        raise InputError(f"{where}: reshape_activations {hook_z!r} is not supported ('none' or 'hook_z')")
    hook_name = meta.get("hook_name") or cfg.get("hook_name")
    if not isinstance(hook_name, str) or not hook_name:
        raise InputError(f"{where}: no hook_name (the model tensor the SAE reads)")
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in DTYPES:
        raise InputError(f"{where}: dtype {dtype!r} is not supported; pyinterp reads {', '.join(DTYPES)}")
    if not isinstance(cfg.get("apply_b_dec_to_input", True), bool):
        raise InputError(f"{where}: apply_b_dec_to_input must be true or false, got {cfg['apply_b_dec_to_input']!r}")
    if architecture == "topk" and "k" not in cfg:
        raise InputError(f"{where}: a topk SAE without k (the number of features it keeps)")
    return {
        "architecture": architecture, "hook_name": hook_name, "hook_z": hook_z == "hook_z", "dtype": dtype,
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)), "model_name": str(meta.get("model_name") or ""),
        "k": cfg.get("k") if architecture == "topk" else None,
        "rescale": architecture == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
    }


def _from_parts(settings: dict, tensors: dict[str, np.ndarray], where: Path) -> SAE:
    """An SAE from its settings and weights (the tensors the architecture needs, no others), the weights
    rounded to the cfg's dtype as SAELens casts them; TopK's decoder-norm rescaling folded in (then float32)."""
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not np.all(scale == 1):
        raise InputError(f"{where}: a finetuning scaling_factor other than ones is not supported")
    needed = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if settings["architecture"] == "jumprelu" else set())
    if set(tensors) != needed:
        raise InputError(f"{where / WEIGHTS_FILE}: a {settings['architecture']} SAE has tensors {sorted(needed)}, "
                         f"this file {sorted(tensors)}")
    t = {name: rounded(value, DTYPES[settings["dtype"]]) for name, value in tensors.items()}
    sae = SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], settings["hook_name"], settings["architecture"],
              t.get("threshold"), settings["k"], settings["apply_b_dec_to_input"], settings["hook_z"],
              settings["dtype"], settings["model_name"])
    if [sae.d_in, sae.d_sae] != [settings["d_in"], settings["d_sae"]]:
        raise InputError(f"{where}: the weights are d_in {sae.d_in}, d_sae {sae.d_sae}; the cfg says d_in "
                         f"{settings['d_in']}, d_sae {settings['d_sae']}")
    if not settings["rescale"]:
        return sae
    norm = np.linalg.norm(sae.W_dec, axis=1)
    live = norm > 0  # a zero decoder row: pre times 0 is 0 in SAELens too, so the feature never fires
    W_dec = sae.W_dec.copy()
    W_dec[live] /= norm[live, None]
    return replace(sae, W_enc=sae.W_enc * norm, b_enc=sae.b_enc * norm, W_dec=W_dec, dtype="float32")


def random_sae(d_in: int, d_sae: int, architecture: str = "standard", seed: int = 0,
               hook_name: str = "blocks.0.hook_resid_post", k: int = 8, dtype: str = "float32",
               apply_b_dec_to_input: bool = True, hook_z: bool = False) -> SAE:
    """A random SAE (for tests and examples): unit-norm decoder rows ``N(0, 1)``, the encoder their transpose
    plus noise of std 0.1, biases ``N(0, 0.1)``, JumpReLU thresholds uniform in [0, 1), TopK keeping ``k``;
    values rounded to ``dtype`` (so a saved file holds them exactly)."""
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(d_sae, d_in))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    W_enc = W_dec.T + rng.normal(0, 0.1, size=(d_in, d_sae))
    parts = [W_enc, rng.normal(0, 0.1, d_sae), W_dec, rng.normal(0, 0.1, d_in)]
    threshold = rng.uniform(0, 1, d_sae) if architecture == "jumprelu" else None
    st = DTYPES.get(dtype, "F32")  # SAE() refuses another dtype
    parts = [rounded(p.astype(np.float32), st) for p in parts]
    if threshold is not None:
        threshold = rounded(threshold.astype(np.float32), st)
    return SAE(*parts, hook_name=hook_name, architecture=architecture, threshold=threshold,
               k=k if architecture == "topk" else None, apply_b_dec_to_input=apply_b_dec_to_input, hook_z=hook_z,
               dtype=dtype)


@dataclass
class SAEFeatures:
    """The SAE features of a prompt's activations at the SAE's hook, per token.

    ``ids`` and ``values`` are ``[n_tokens, top_k]``: the most active features, largest first (id -1 and value 0
    where fewer than top_k are active); ``l0`` ``[n_tokens]`` counts the active (non-zero) features;
    ``rel_error`` ``[n_tokens]`` is ``|x - x_hat| / |x|`` and ``cosine`` ``[n_tokens]`` the cosine of ``x`` and
    its reconstruction ``x_hat`` (NaN where either is zero). ``tensor`` is the model tensor read (``l_out-5``).
    """

    hook_name: str
    tensor: str
    tokens: list[int]
    token_strs: list[str]
    ids: np.ndarray
    values: np.ndarray
    l0: np.ndarray
    rel_error: np.ndarray
    cosine: np.ndarray


def top_features(f: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` largest entries of each row of ``f`` ``[n_tokens, d_sae]`` (>= 0), largest first:
    ``(ids, values)``, each ``[n_tokens, top_k]``; id -1 (value 0) for entries that are 0."""
    top = np.argpartition(-f, top_k - 1, axis=1)[:, :top_k]
    values = np.take_along_axis(f, top, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    ids, values = np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1)
    return np.where(values > 0, ids, -1).astype(np.int64), values.astype(np.float32)


def sae_readout(model: ModelLike, sae: SAE, top_k: int, edits: dict[int, float], scale: bool) -> SAEReadout:
    """The SAE encoding its tensor inside the next pass of ``model``, with optional feature edits."""
    name, layer = sae.hook_tensor(model)
    return SAEReadout(upload_sae(model.engine, sae, layer), name, layer, top_k, edits, scale, layer == model.n_layer - 1)


def _check_top_k(sae: SAE, top_k: object) -> int:
    if not is_int(top_k) or not 1 <= top_k <= sae.d_sae:
        raise InputError(f"top_k must be an integer in 1..{sae.d_sae} (the SAE's features), got {top_k!r}")
    return int(top_k)


def sae_features(model: ModelLike, sae: SAE, tokens_or_text: str | Sequence[int], top_k: int = 10) -> SAEFeatures:
    """Encode every token's row of the SAE's hook tensor inside the graph: top-k features, L0 and reconstruction
    error per token (:class:`SAEFeatures`); only those leave the device."""
    run = sae_readout(model, sae, _check_top_k(sae, top_k), {}, False)
    ids = model.prompt_ids(tokens_or_text)
    top, values, stats = model.engine.run(ids, readout=run, logits="last").readout
    order = np.argsort(-values, axis=1, kind="stable")
    top, values = np.take_along_axis(top, order, 1), np.take_along_axis(values, order, 1)
    err, norm, dot, norm_hat, l0 = (stats[:, i].astype(np.float64) for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_error = np.where(norm > 0, np.sqrt(np.maximum(err, 0) / norm), np.nan)
        cosine = np.where(norm * norm_hat > 0, dot / np.sqrt(norm * norm_hat), np.nan)
    label = run.name if run.layer < 0 else f"{run.name}-{run.layer}"
    return SAEFeatures(sae.hook_name, label, ids, [model.token_str(t) for t in ids],
                       np.where(values > 0, top, -1).astype(np.int64), np.maximum(values, 0).astype(np.float32),
                       l0.astype(np.int64), rel_error.astype(np.float32), cosine.astype(np.float32))


def steer_features(model: ModelLike, sae: SAE, tokens_or_text: str | Sequence[int], edits: dict[int, float],
                   scale: bool = False) -> np.ndarray:
    """Logits ``[n_tokens, n_vocab]`` with the SAE's features edited inside the graph: feature ``j`` of every token
    becomes ``edits[j]`` (or is multiplied by it, ``scale``). The tensor becomes ``x + (f' - f) W_dec``, so the
    SAE's reconstruction error stays in and only the edited features change."""
    if not isinstance(edits, dict) or not edits:
        raise InputError("edits must be a non-empty {feature: value} dict")
    for j, v in edits.items():
        if not isinstance(j, (int, np.integer)) or not 0 <= j < sae.d_sae:
            raise InputError(f"feature {j!r} out of range (the SAE has {sae.d_sae} features)")
        if not isinstance(v, (int, float, np.floating)) or not np.isfinite(v):
            raise InputError(f"feature {j}: the value must be a finite number, got {v!r}")
    run = sae_readout(model, sae, 1, {int(j): float(v) for j, v in edits.items()}, scale)
    return model.engine.run(model.prompt_ids(tokens_or_text), readout=run).logits
