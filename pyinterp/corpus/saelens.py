"""Activations written as the Hugging Face ``datasets`` on-disk dataset SAELens trains from.

The format is SAELens's ``CacheActivationsRunner`` output (``sae_lens/cache_activations_runner.py``, v6.54), which
its ``ActivationsStore`` reads back with ``use_cached_activations=True`` / ``cached_activations_path=DIR``
(``datasets.load_from_disk(DIR)``):

- one row per context; one column per hook, named by the hook, of feature type ``Array2D(shape=(context_size,
  d_in), dtype)``, and a ``token_ids`` column of type ``Sequence(Value("int32"), length=context_size)``;
- the directory ``Dataset.save_to_disk`` makes: ``data-0000I-of-0000N.arrow`` (Arrow IPC streams, the features in
  the schema metadata), ``dataset_info.json`` (the features) and ``state.json`` (the data files, a fingerprint, no
  format, no split).

SAELens checks that the dataset has a column named by its ``hook_name`` and that the column's shape is
``(context_size, d_in)``; it converts the values to its own ``dtype`` as it reads them (``set_format("torch",
dtype=...)``), so float16 storage trains a float32 SAE. Arrow has no bfloat16: the stored dtype is float32 or
float16.

Hook names: SAELens trains on the column whose name is its ``hook_name``; the columns carry the names the user
gave (a TransformerLens name such as ``blocks.3.hook_resid_post``, or a pyinterp name such as ``l_out-3``). A
TransformerLens name is the one to give: the trained SAE's ``cfg.json`` then records it, and ``pyinterp.SAE.load``
maps it back to the model's tensor.

``datasets`` is the optional extra ``pip install "pyinterp[saelens]"``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pyinterp.errors import InputError

DTYPES = ("float32", "float16")
# a data file is closed once it holds this many bytes (datasets' save_to_disk default shard size)
SHARD_BYTES = 500 * 2**20
# rows written to Arrow at once, at most (keeps each Arrow batch and its int32 list offsets small)
BATCH_BYTES = 64 * 2**20


def _datasets() -> Any:
    try:
        import datasets
        from datasets.arrow_writer import ArrowWriter
        from datasets.features.features import Array2DExtensionType
    except ImportError:
        raise InputError('the SAELens format needs the datasets package: pip install "pyinterp[saelens]"') from None
    return datasets, ArrowWriter, Array2DExtensionType


class SaeLensWriter:
    """Streams contexts into a SAELens cached-activations dataset at ``out_dir``.

    ``hooks``: hook name -> ``d_in`` (the width of its rows), one column each; ``context_size``: tokens per context;
    ``dtype``: the stored type, ``"float32"`` or ``"float16"``. Call :meth:`add` with each batch of contexts, then
    :meth:`close`. Data files are written as contexts come (memory is bounded by one :meth:`add`), into a hidden
    temporary directory beside ``out_dir`` that :meth:`close` renames to ``out_dir``: an interrupted run leaves no
    ``out_dir``. :meth:`abort` removes the temporary directory; a ``with`` block closes or aborts.
    """

    def __init__(self, out_dir: str | os.PathLike, hooks: dict[str, int], context_size: int,
                 dtype: str = "float32") -> None:
        datasets, self._ArrowWriter, self._Array2D = _datasets()
        if not isinstance(hooks, dict) or not hooks:
            raise InputError("the SAELens format needs at least one hook (name -> d_in)")
        if "token_ids" in hooks:
            raise InputError("'token_ids' is the SAELens dataset's token column, not a hook name")
        for name, d_in in hooks.items():
            if not isinstance(name, str) or not name or not isinstance(d_in, int) or d_in < 1:
                raise InputError(f"hook {name!r}: d_in must be a positive integer, got {d_in!r}")
        if not isinstance(context_size, int) or context_size < 1:
            raise InputError(f"context_size must be a positive integer, got {context_size!r}")
        if dtype not in DTYPES:
            raise InputError(f"the SAELens format stores {' or '.join(DTYPES)} (Arrow has no bfloat16), got {dtype!r}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise InputError(f"{self.out_dir} already exists and is not an empty directory")
        self.hooks = dict(hooks)
        self.context_size = context_size
        self.dtype = dtype
        self.features = datasets.Features({
            **{name: datasets.Array2D(shape=(context_size, d_in), dtype=dtype) for name, d_in in hooks.items()},
            "token_ids": datasets.Sequence(datasets.Value("int32"), length=context_size),
        })
        self._info = datasets.DatasetInfo(features=self.features)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.tmp_dir.mkdir(parents=True)
        except OSError as e:
            raise InputError(f"cannot create {self.tmp_dir}: {e.strerror or e}") from None
        self._files: list[Path] = []
        self._writer: Any = None
        self._file_bytes = 0
        self.n_contexts = 0
        self.closed = False

    def add(self, tensors: dict[str, np.ndarray], token_ids: np.ndarray) -> None:
        """Append contexts: ``tensors`` maps every hook to ``[n_ctx, context_size, d_in]`` activations,
        ``token_ids`` is ``[n_ctx, context_size]``."""
        if self.closed:
            raise InputError("the SAELens writer is closed")
        token_ids = np.asarray(token_ids)
        if token_ids.ndim != 2 or token_ids.shape[1] != self.context_size:
            raise InputError(f"token_ids must be [n_ctx, {self.context_size}], got {list(token_ids.shape)}")
        if set(tensors) != set(self.hooks):
            raise InputError(f"the SAELens dataset has hooks {sorted(self.hooks)}, this batch {sorted(tensors)}")
        n = token_ids.shape[0]
        arrays = {}
        for name, d_in in self.hooks.items():
            a = np.asarray(tensors[name])
            if a.shape != (n, self.context_size, d_in):
                raise InputError(f"{name}: activations must be [{n}, {self.context_size}, {d_in}] (n_ctx, "
                                 f"context_size, d_in), got {list(a.shape)}")
            arrays[name] = a
        row_bytes = self.context_size * sum(self.hooks.values()) * np.dtype(self.dtype).itemsize
        step = max(1, BATCH_BYTES // row_bytes)
        try:
            for start in range(0, n, step):
                part = slice(start, min(n, start + step))
                self._write({name: a[part] for name, a in arrays.items()}, token_ids[part])
        except OSError as e:
            self.abort()
            raise InputError(f"cannot write the SAELens dataset in {self.tmp_dir}: {e.strerror or e} (removed)") from None

    def _write(self, arrays: dict[str, np.ndarray], token_ids: np.ndarray) -> None:
        """One Arrow batch into the current data file (a new one when the last is full)."""
        import pyarrow as pa

        n = token_ids.shape[0]
        columns = {name: self._array2d(a) for name, a in arrays.items()}
        ids = np.ascontiguousarray(token_ids, dtype=np.int32).reshape(-1)
        columns["token_ids"] = pa.FixedSizeListArray.from_arrays(pa.array(ids), self.context_size)
        table = pa.table(columns)
        if self._writer is None:
            path = self.tmp_dir / f"part-{len(self._files):05d}.arrow"
            self._writer = self._ArrowWriter(features=self.features, path=str(path))
            self._files.append(path)
            self._file_bytes = 0
        self._writer.write_table(table)
        self.n_contexts += n
        self._file_bytes += table.nbytes
        if self._file_bytes >= SHARD_BYTES:
            self._finish_file()

    def _array2d(self, a: np.ndarray) -> Any:
        """``[n, context_size, d_in]`` as datasets' Array2D Arrow array: lists (contexts) of lists (tokens)."""
        import pyarrow as pa

        n, ctx, d_in = a.shape
        values = pa.array(np.ascontiguousarray(a, dtype=self.dtype).reshape(-1))
        rows = pa.ListArray.from_arrays(pa.array(np.arange(0, n * ctx + 1, dtype=np.int32) * d_in), values)
        contexts = pa.ListArray.from_arrays(pa.array(np.arange(0, n + 1, dtype=np.int32) * ctx), rows)
        return pa.ExtensionArray.from_storage(self._Array2D((ctx, d_in), self.dtype), contexts)

    def _finish_file(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer = None

    def close(self) -> Path:
        """Finish the last data file, write ``dataset_info.json`` and ``state.json``, and rename the temporary
        directory to ``out_dir``; returns ``out_dir``. An empty dataset is refused (and removed)."""
        if self.closed:
            return self.out_dir
        if self.n_contexts == 0:
            self.abort()
            raise InputError("no contexts were written: the SAELens dataset would be empty")
        try:
            self._finish_file()
            n = len(self._files)
            names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
            for path, name in zip(self._files, names):
                path.rename(self.tmp_dir / name)
            self._info.write_to_directory(str(self.tmp_dir))
            state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": secrets.token_hex(8),
                     "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                     "_output_all_columns": False, "_split": None}
            (self.tmp_dir / "state.json").write_text(json.dumps(state, indent=2))
        except OSError as e:
            self.abort()
            raise InputError(f"cannot write the SAELens dataset in {self.tmp_dir}: {e.strerror or e} (removed)") from None
        try:
            if self.out_dir.is_dir():
                self.out_dir.rmdir()  # empty, checked when the writer was made
            self.tmp_dir.rename(self.out_dir)
        except OSError as e:
            raise InputError(f"cannot move the dataset to {self.out_dir}: {e.strerror or e} (it is complete in "
                             f"{self.tmp_dir})") from None
        self.closed = True
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written: the temporary directory is removed, ``out_dir`` is not made."""
        if self._writer is not None:
            try:
                self._writer.finalize()
            except Exception:  # noqa: BLE001 - the files are removed anyway
                pass
            self._writer = None
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> "SaeLensWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
