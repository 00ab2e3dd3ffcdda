"""Spawning producer processes from anywhere a trainer runs: scripts, notebooks, stdin, ``python -c``.

Producers are *spawned* (a fresh interpreter; fork does not survive CUDA or torch's threads). A spawned
child rebuilds the parent's ``__main__`` before it unpickles its arguments: from ``__main__.__spec__``
(``python -m pkg``) or by re-running ``__main__.__file__`` (``python train.py``). That breaks in two
common places:

- a Jupyter notebook (``__main__`` is the kernel's namespace: no file, no spec). The child gets an empty
  ``__main__``, so a dataset class defined in a cell cannot be found there: ``AttributeError: Can't get
  attribute 'MyDataset' on <module '__main__'>`` and the producer dies while starting;
- a script read from stdin (``python - <<EOF``): ``__main__.__file__`` is ``'<stdin>'`` and the child
  tries to run that path (``FileNotFoundError: '<stdin>'``).

:func:`spawning` stops the child from re-running a main module that is not a real file, and
:func:`portable` wraps a spawn argument so that, when ``__main__`` cannot be rebuilt in the child (or the
argument does not pickle the standard way, e.g. a class local to a function), it is pickled with
cloudpickle: classes and functions of ``__main__`` travel by value, while tensors still go through
torch's shared-memory reductions (the ``multiprocessing`` reducers are kept). What even cloudpickle
cannot pickle (open files, locks, generators, sockets) raises :class:`SpawnPicklingError` at spawn, in
the trainer, naming the object and what to do.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import threading
from collections import ChainMap
from multiprocessing.reduction import ForkingPickler

__all__ = ["SpawnPicklingError", "main_is_importable", "portable", "spawning"]

# Process.start() reads __main__.__file__ while pickling the preparation data; one start at a time may
# hide it (producers restart from a collector thread while another loader may be starting).
_MAIN_LOCK = threading.RLock()


class SpawnPicklingError(pickle.PicklingError, TypeError):
    """An argument of a spawned producer cannot be sent to it (the message says what and what to do)."""


def main_is_importable() -> bool:
    """Whether a spawned child can rebuild this process's ``__main__`` (and so find the classes in it).

    True for ``python -m pkg`` (a module spec) and for ``python file.py`` with the file still there; False
    in a notebook or IPython shell, for ``python -c`` and for a script read from stdin."""
    main = sys.modules.get("__main__")
    if main is None:
        return True
    if getattr(getattr(main, "__spec__", None), "name", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and path.endswith(".py") and os.path.isfile(path)


@contextlib.contextmanager
def spawning():
    """Around ``process.start()`` of a spawn-context process: when ``__main__`` names a file that is not
    there to re-run (``'<stdin>'``), hide that name while the child's preparation data is taken, so the
    child leaves its ``__main__`` alone instead of failing to run the path. Everything else is unchanged."""
    with _MAIN_LOCK:
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None)
        hide = (main is not None and path is not None and getattr(getattr(main, "__spec__", None), "name", None) is None
                and not main_is_importable())  # fmt: skip
        if hide:
            del main.__file__
        try:
            yield
        finally:
            if hide:
                main.__file__ = path


def portable(obj, what: str = "the dataset"):
    """``obj`` wrapped for a spawned child's arguments; the child receives ``obj`` itself (a copy).

    ``what`` names it in the error raised when it cannot be pickled at all."""
    return _Portable(obj, what)


class _Portable:
    __slots__ = ("obj", "what")

    def __init__(self, obj, what: str):
        self.obj, self.what = obj, what

    def __reduce__(self):
        # Runs inside Process.start()'s pickling, so multiprocessing's spawning context is live and torch's
        # shared-memory reductions (file descriptors handed to the child) work from here as they do there.
        if main_is_importable():
            try:
                return pickle.loads, (_dumps(ForkingPickler, self.obj),)
            except (pickle.PicklingError, TypeError, AttributeError):
                pass  # e.g. a class local to a function: cloudpickle sends it by value
        try:
            cloud = _cloud_pickler()
        except ImportError as e:  # cloudpickle is a dependency; a broken install should still say so
            raise SpawnPicklingError(
                f"{self.what} must be sent to spawned producer processes, and "
                f"classes defined in a notebook or a script read from stdin need cloudpickle: pip install cloudpickle"
            ) from e
        try:
            return pickle.loads, (_dumps(cloud, self.obj),)
        except Exception as e:  # noqa: BLE001 - any pickling failure is reported the same way
            raise SpawnPicklingError(
                f"{self.what} cannot be sent to the "
                f"producer processes, which are spawned (a fresh Python process each): {type(e).__name__}: {e}. "
                "Keep unpicklable members (open files, locks, database or network connections, generators) "
                "out of it -- open them lazily on first use in __getitem__ -- or define the dataset in an "
                "importable .py module and import it in the notebook or script."
            ) from e


def _dumps(pickler_class, obj) -> bytes:
    buf = io.BytesIO()
    pickler_class(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _cloud_pickler():
    """cloudpickle's Pickler with multiprocessing's reducers in front (torch tensors via shared memory)."""
    import cloudpickle

    # ForkingPickler's instance table is copyreg's plus the reducers registered so far (torch registers its
    # tensor and storage reductions there); cloudpickle's own table comes after them.
    forking = ForkingPickler(io.BytesIO()).dispatch_table

    class _CloudForkingPickler(cloudpickle.Pickler):
        dispatch_table = ChainMap(forking, cloudpickle.Pickler.dispatch_table)

    return _CloudForkingPickler
