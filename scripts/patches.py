#!/usr/bin/env python3
"""Maintain the patch series in patches/ against the pinned llama.cpp.

  check              apply the whole series to a fresh copy of the source; name the patch that fails
  worktree DIR       make DIR a git repository holding the source with one commit per patch,
                     ready to be edited, rebased or extended with new commits
  regen DIR          rewrite patches/ from the commits of DIR made after its first commit
                     (the pristine source), one NNNN-subject.patch per commit

Typical loop: `worktree /tmp/lw`, edit and `git commit` there (or `git rebase -i` to amend a
patch), then `regen /tmp/lw` and `check`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from llama_source import REPO, SourceError, apply_series, copy_parts, locate, series

PATCHES = REPO / "patches"
GIT_ID = ["-c", "user.name=pyinterp", "-c", "user.email=pyinterp@localhost"]


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *GIT_ID, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SourceError(f"git {' '.join(args)} failed in {cwd}:\n{done.stdout.strip()}")
    return done.stdout


def check(source: str | None) -> None:
    src, origin = locate(source)
    todo = series(PATCHES)
    with tempfile.TemporaryDirectory(prefix="pyinterp-check-") as tmp:
        copy_parts(src, Path(tmp))
        for patch in todo:
            apply_series(Path(tmp), [patch])
            print(f"ok   {patch.name}")
    print(f"{len(todo)} patches apply to {origin}")


def worktree(source: str | None, dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        raise SourceError(f"{dest} exists and is not empty")
    src, origin = locate(source)
    dest.mkdir(parents=True, exist_ok=True)
    copy_parts(src, dest)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", f"llama.cpp source ({origin})")
    for patch in series(PATCHES):
        git(dest, "am", "-q", "--keep-cr", str(patch))
    print(f"{dest}: source plus {len(series(PATCHES))} patches as commits")


def regen(tree: Path) -> None:
    base = git(tree, "rev-list", "--max-parents=0", "HEAD").split()[-1]
    for old in series(PATCHES):
        old.unlink()
    out = git(tree, "format-patch", "--zero-commit", "--no-signature", "--no-stat", "-o", str(PATCHES), f"{base}..HEAD")
    for line in out.split():
        print(Path(line).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="llama.cpp source tree (default: submodule, else the PyPI sdist)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    sub.add_parser("worktree").add_argument("dir", type=Path)
    sub.add_parser("regen").add_argument("dir", type=Path)
    args = parser.parse_args()
    try:
        if args.command == "check":
            check(args.source)
        elif args.command == "worktree":
            worktree(args.source, args.dir)
        else:
            regen(args.dir)
    except SourceError as e:
        print(f"pyinterp: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
