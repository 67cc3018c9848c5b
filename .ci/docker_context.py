"""Lay out the build context a Dockerfile's COPY lines see, without Docker: ``docker_context.py DOCKERFILE DIR``.

Each ``COPY SRC... DEST`` (not ``--from``) copies its sources from the repository into DIR, less
what .dockerignore drops; a source that is missing, or that .dockerignore drops, fails the check
(``docker build`` would fail there too).
"""

from __future__ import annotations

import fnmatch
import shlex
import shutil
import sys
from pathlib import Path


def ignored_patterns(root: Path) -> list[str]:
    lines = (root / ".dockerignore").read_text().splitlines()
    return [line.strip().removeprefix("**/") for line in lines if line.strip() and not line.startswith("#")]


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line)
        if not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def main(dockerfile: str, out: str) -> None:
    root = Path(dockerfile).resolve().parent
    patterns = ignored_patterns(root)

    def dropped(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    for source in copy_sources(Path(dockerfile)):
        path = root / source
        if not path.exists() or dropped(source.rstrip("/")):
            sys.exit(f"{dockerfile}: COPY {source}: not in the build context")
        target = Path(out) / source
        if path.is_dir():
            shutil.copytree(path, target, ignore=lambda _, names: [n for n in names if dropped(n)])
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


if __name__ == "__main__":
    main(*sys.argv[1:3])
