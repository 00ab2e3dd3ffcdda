"""The pool's temporary folder: the latent cache its producers share when no ``latent_cache_path`` is given.

One folder per pool, shared by all its producers (one private cache per producer would encode every
image once per producer and rarely hit under DDP's changing shards -- issue 14). The pool removes it in
``close`` after its producers have exited, which covers ``with``, garbage collection, interpreter exit and
every producer fault. The one path no code runs on, a SIGKILLed trainer, is covered at the next start:
folders are named after the creating pid, and ``sweep_stale`` removes those whose process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

__all__ = ["make_scratch", "remove_scratch", "sweep_stale"]

PREFIX = "fusionloader-pool-"  # not the engine's "fusionloader-latents-": never sweep its folders
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to judge
        return True
    return True


def sweep_stale(root: str | None = None) -> list[str]:
    """Remove scratch folders left by trainers that died without closing their pool; returns them."""
    root = tempfile.gettempdir() if root is None else root
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        m = _NAME.match(name)
        path = os.path.join(root, name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def make_scratch(root: str | None = None) -> str:
    """A fresh private folder (0700) named after this process."""
    sweep_stale(root)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)


def remove_scratch(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
