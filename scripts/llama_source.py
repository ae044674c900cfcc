#!/usr/bin/env python3
"""Locate the pinned llama.cpp source and prepare a patched copy of it for the build.

The source is, in order of preference:
  1. the directory given with --source (or the PYINTERP_LLAMA_SOURCE environment variable),
  2. the llama.cpp git submodule, when it is checked out,
  3. vendor/llama.cpp of the PyPI sdist llama-cpp-python==0.3.35, downloaded once with pip (a build
     requirement, so it works inside pip's isolated build environment),
     checked against its sha256 and unpacked into the cache directory
     ($PYINTERP_CACHE, default ~/.cache/pyinterp).

`prepare` copies the parts of the tree the build needs, applies patches/NNNN-*.patch in order
and writes the result into the destination, touching only files whose content changed so
that an unchanged source and series rebuild nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_COMMIT = "4df29be4f4c3673f428170fda944a5b19f743bb8"
SDIST_NAME = "llama_cpp_python-0.3.35.tar.gz"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.35"
SDIST_SHA256 = "1139dbb54509074b70893fab8554e3b079aa9f4d312058ce4018ef0019e3de12"
SDIST_PREFIX = "llama_cpp_python-0.3.35/vendor/llama.cpp/"

# what the build of the llama and ggml libraries reads
BUILD_PARTS = ("CMakeLists.txt", "LICENSE", "cmake", "ggml", "include", "src")

REPO = Path(__file__).resolve().parent.parent


class SourceError(Exception):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("PYINTERP_CACHE") or Path.home() / ".cache" / "pyinterp")


def is_llama_tree(path: Path) -> bool:
    return (path / "CMakeLists.txt").is_file() and (path / "src" / "llama-graph.cpp").is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    """Return the verified sdist in the cache, downloading it with pip when absent."""
    sdist = cache / SDIST_NAME
    if not sdist.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"pyinterp: downloading {SDIST_REQUIREMENT} (sdist) into {cache}", file=sys.stderr)
        # pip, not urllib: it honours the user's configuration (index URLs, mirrors, proxies, certificates).
        # It is a build requirement (pyproject.toml), so it is there inside pip's isolated build environment.
        # --no-cache-dir: an empty PYINTERP_CACHE always means a real download, never one from pip's cache.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
               "--no-build-isolation", "--no-cache-dir", "--dest", str(cache), SDIST_REQUIREMENT]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not sdist.is_file():
            raise SourceError(f"could not download {SDIST_REQUIREMENT}:\n{done.stdout.strip()}")
    digest = sha256_of(sdist)
    if digest != SDIST_SHA256:
        sdist.unlink()
        raise SourceError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}; removed it, try again")
    return sdist


def unpack_sdist(sdist: Path, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                if not member.name.startswith(SDIST_PREFIX):
                    continue
                member.name = member.name[len(SDIST_PREFIX):]
                if member.name.split("/")[0] in BUILD_PARTS:
                    members.append(member)
            tar.extractall(tmp, members=members, filter="data")
        if not is_llama_tree(tmp):
            raise SourceError(f"{sdist} does not contain {SDIST_PREFIX}")
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def locate(source: str | None) -> tuple[Path, str]:
    """Return (llama.cpp source directory, a description of where it came from)."""
    source = source or os.environ.get("PYINTERP_LLAMA_SOURCE")
    if source:
        path = Path(source).expanduser().resolve()
        if not is_llama_tree(path):
            raise SourceError(f"{path} is not a llama.cpp source tree (no CMakeLists.txt and src/llama-graph.cpp)")
        return path, f"local checkout {path}"
    submodule = REPO / "llama.cpp"
    if is_llama_tree(submodule):
        return submodule, f"git submodule {submodule}"
    cache = cache_dir()
    unpacked = cache / f"llama.cpp-{LLAMA_COMMIT[:12]}"
    if not is_llama_tree(unpacked):
        unpack_sdist(fetch_sdist(cache), unpacked)
    return unpacked, f"PyPI sdist {SDIST_REQUIREMENT} (sha256 verified), unpacked in {unpacked}"


def series(patches: Path) -> list[Path]:
    return sorted(p for p in patches.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def copy_parts(src: Path, dest: Path) -> None:
    for part in BUILD_PARTS:
        s = src / part
        if s.is_dir():
            shutil.copytree(s, dest / part, ignore=shutil.ignore_patterns(".git"))
        elif s.is_file():
            shutil.copy2(s, dest / part)


def apply_series(tree: Path, patches: list[Path]) -> None:
    for patch in patches:
        done = subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch)], cwd=tree,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise SourceError(f"patch {patch.name} does not apply:\n{done.stdout.strip()}")


def sync_tree(src: Path, dest: Path) -> int:
    """Make dest equal to src, writing only files that differ; return how many were written."""
    written = 0
    wanted = set()
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        wanted.add(rel)
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.is_file() or target.read_bytes() != path.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            written += 1
    for path in sorted(dest.rglob("*"), reverse=True):
        if path.relative_to(dest) not in wanted and path.name != STAMP:
            path.rmdir() if path.is_dir() else path.unlink()
    return written


STAMP = ".pyinterp-stamp"


def prepare(source: str | None, patches: Path, dest: Path) -> str:
    src, origin = locate(source)
    todo = series(patches)
    key = hashlib.sha256(str(src).encode())
    for patch in todo:
        key.update(patch.name.encode() + patch.read_bytes())
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text() == key.hexdigest():
        return origin
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyinterp-llama-") as tmp:
        staging = Path(tmp)
        copy_parts(src, staging)
        apply_series(staging, todo)
        written = sync_tree(staging, dest)
    stamp.write_text(key.hexdigest())
    print(f"pyinterp: applied {len(todo)} patches, {written} files changed in {dest}", file=sys.stderr)
    return origin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_locate = sub.add_parser("locate", help="print the llama.cpp source directory")
    p_locate.add_argument("--source")
    p_prepare = sub.add_parser("prepare", help="write a patched copy of the source")
    p_prepare.add_argument("--source")
    p_prepare.add_argument("--patches", type=Path, default=REPO / "patches")
    p_prepare.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args()
    try:
        if args.command == "locate":
            print(locate(args.source)[0])
        else:
            print(prepare(args.source, args.patches, args.dest))
    except SourceError as e:
        print(f"pyinterp: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
