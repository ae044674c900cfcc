"""What every ``pyinterp`` command shares: the model options (llama-cli's names and meanings) and the one
function that opens the Model from them, and the one syntax of a list of layers."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Callable

import click

from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.model import Model

MAX_THREADS = 512  # GGML_MAX_N_THREADS
INT32_MAX = 2**31 - 1
FLASH = {"on": True, "off": False, "auto": None}


@dataclass(frozen=True)
class ModelOptions:
    """The model options of a command line, as :class:`pyinterp.Model` takes them (see :meth:`kwargs`)."""

    path: str | None
    n_ctx: int
    n_threads: int | None
    n_gpu_layers: int | None
    flash_attn: bool | None
    type_k: str
    type_v: str
    rpc: str | None
    verbose: bool

    def kwargs(self) -> dict:
        """Every setting but the path, as keyword arguments of :class:`pyinterp.Model`."""
        settings = asdict(self)
        del settings["path"]
        return settings

    def open(self) -> Model:
        """The Model these options name (use it in a ``with`` block)."""
        from pyinterp.model import Model

        return Model(self.path, **self.kwargs())


def _threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """``-t`` as llama-cli reads it: 0 or less is the default (every core); at most ggml's 512."""
    if value is None or value <= 0:
        return None
    if value > MAX_THREADS:
        raise click.BadParameter(f"{value} is more than ggml's {MAX_THREADS} threads", ctx, param)
    return value


def _options(threads: tuple[str, ...]) -> list[Callable]:
    return [
        click.option("-m", "--model", "model_path", default=None, metavar="PATH",
                     help="GGUF file, or a known name (smollm2, gemma3). Default: the bundled SmolLM2."),
        click.option("-c", "--ctx-size", default=2048, show_default=True, type=click.IntRange(min=8),
                     help="Context size (tokens, at least 8)."),
        click.option(*threads, "threads", default=None, type=int, callback=_threads,
                     help="Threads (default, or 0 or less: all cores)."),
        click.option("--n-gpu-layers", "-ngl", default=None, type=click.IntRange(-1, INT32_MAX),
                     help="Layers to offload to the GPU (-1: all). Default: $PYINTERP_N_GPU_LAYERS, else 0."),
        click.option("-fa", "--flash-attn", type=click.Choice(list(FLASH)), default="off", show_default=True,
                     help="Flash attention. pyinterp's default runs the explicit attention path on every layer (faithful)."),
        click.option("-ctk", "--cache-type-k", default="f32", show_default=True, metavar="TYPE",
                     help="KV cache type for K (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1)."),
        click.option("-ctv", "--cache-type-v", default="f32", show_default=True, metavar="TYPE",
                     help="KV cache type for V (quantized types need flash attention)."),
        click.option("--rpc", default=None, metavar="HOST:PORT",
                     help="Offload the --n-gpu-layers layers to a ggml RPC server (python -m pyinterp.engine.rpc)."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
        click.option("--debug", is_flag=True, expose_value=False, help="Show tracebacks of errors."),
    ]


_NAMES = ("model_path", "ctx_size", "threads", "n_gpu_layers", "flash_attn", "cache_type_k", "cache_type_v", "rpc",
          "verbose")


def model_options(command: Callable, threads: tuple[str, ...] = ("-t", "--threads")) -> Callable:
    """Add the model options to a click command function, which gets them as one ``model_opts:``
    :class:`ModelOptions` argument instead of one argument each. ``threads``: the option's names (commands whose
    ``-t`` names a tensor, as ``pyinterp extract``, take ``("--threads",)``)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        given = [kwargs.pop(name) for name in _NAMES]
        path, n_ctx, n_threads, n_gpu_layers, flash, type_k, type_v, rpc, verbose = given
        opts = ModelOptions(path, n_ctx, n_threads, n_gpu_layers, FLASH[flash], type_k, type_v, rpc, verbose)
        return command(*args, model_opts=opts, **kwargs)

    for option in reversed(_options(threads)):
        wrapper = option(wrapper)
    return wrapper


# layer lists

LAYERS_HELP = ("comma list of layers: indices (negative from the end: -1 = last), 'last', depth fractions "
               "(0.5 or 1/2 or 50% = the middle layer, 1.0 = last), and inclusive ranges A-B of those (2-5, 10--1, "
               "0.5-last, 40%-85%)")
_INT = re.compile(r"[+-]?\d+")
_RANGE = re.compile(r"(-?[^-]+)-(-?[^-]+)")


@dataclass(frozen=True)
class LayerList:
    """A parsed layer list (see :data:`LAYERS_HELP`); :meth:`resolve` turns it into layers of one model."""

    spec: str
    option: str
    items: tuple[tuple[int | Fraction | str, int | Fraction | str], ...]  # (first, last) of each item

    @classmethod
    def parse(cls, spec: str, option: str = "--layers") -> "LayerList":
        """Check the syntax of ``spec``; raises :class:`InputError` (one line) for anything else."""
        items = []
        for item in spec.split(","):
            item = item.strip()
            span = _RANGE.fullmatch(item)
            ends = (span.group(1), span.group(2)) if span and not _INT.fullmatch(item) else (item, item)
            first, last = (cls._one(end.strip(), option) for end in ends)
            items.append((first, last))
        return cls(spec, option, tuple(items))

    @staticmethod
    def _one(item: str, option: str) -> int | Fraction | str:
        if item == "last":
            return item
        if _INT.fullmatch(item):
            return int(item)
        try:
            if item.endswith("%"):
                f = Fraction(item[:-1]) / 100
            elif "/" not in item and "." not in item:
                raise ValueError
            else:
                f = Fraction(item)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"{option}: {item!r} is neither a layer, 'last' nor a depth fraction like 0.5, 1/2 or 50% "
                             f"(see --help)") from None
        if not 0 <= f <= 1:
            raise InputError(f"{option}: depth fraction {item} is not in 0..1")
        return f

    def _layer(self, item: int | Fraction | str, n_layer: int) -> int:
        if item == "last":
            return n_layer - 1
        if isinstance(item, Fraction):
            return min(math.floor(item * n_layer), n_layer - 1)
        if not -n_layer <= item < n_layer:
            raise InputError(f"{self.option}: layer {item} out of range (the model has {n_layer} layers: "
                             f"0..{n_layer - 1}, or -{n_layer}..-1 from the end)")
        return item % n_layer

    def resolve(self, n_layer: int) -> list[int]:
        """The layers of a model of ``n_layer`` layers, sorted, each once."""
        layers: set[int] = set()
        for first, last in self.items:
            a, b = self._layer(first, n_layer), self._layer(last, n_layer)
            if a > b:
                raise InputError(f"{self.option}: range {first}-{last} is empty (layer {a} is after layer {b})")
            layers.update(range(a, b + 1))
        return sorted(layers)


def parse_layers(spec: str, n_layer: int, option: str = "--layers") -> list[int]:
    """``spec`` (see :data:`LAYERS_HELP`) as sorted layers of a model of ``n_layer`` layers."""
    return LayerList.parse(spec, option).resolve(n_layer)


def layer_list(ctx: click.Context, param: click.Parameter, value: str | None) -> LayerList | None:
    """A click callback: the option's layer list, its syntax checked before the model loads."""
    return None if value is None else LayerList.parse(value, param.opts[-1] if param.opts else "--layers")


def progress(length: int, label: str):
    """A progress bar on stderr when it is a terminal; nothing otherwise (pipes and --json stay clean)."""
    if sys.stderr.isatty() and length > 1:
        return click.progressbar(length=length, label=label, file=sys.stderr)
    return contextlib.nullcontext(None)
