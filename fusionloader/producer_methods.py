"""The pool's method options, validated in the trainer at ``ProducerPool(...)`` (issue 8): per-class UNet deltas
(``adapters``) and DisCL's CLIP-score filter (``clip_filter``). What producers do with them is NOTE [Producer
methods] in producer_child.py; here they are only checked and made ready to travel: a ``ClassAdapters`` pickles
as its delta files, a ``ClipFilter`` as its settings (each producer loads its model on its own device).
"""

from __future__ import annotations

import os

__all__ = ["method_options"]


def method_options(adapters, clip_filter, source):
    """``(ClassAdapters | None, ClipFilter | None)`` from ``ProducerPool``'s arguments; each error names the argument.

    ``adapters``: a ``ClassAdapters``, or a folder written by ``fusionloader erase`` (``<class name>.safetensors``
    per class; the names come from the source dataset's ``classes``, label i = ``classes[i]``). ``clip_filter``: a
    ``ClipFilter``; without ``class_names`` of its own it takes the dataset's."""
    from .engine.clip_filter import ClipFilter, class_names_of

    names = None
    if adapters is not None:
        from .engine.adapters import ClassAdapters, deltas_in

        if isinstance(adapters, (str, os.PathLike)):
            folder = os.fspath(adapters)
            if not os.path.isdir(folder):
                raise ValueError(f"adapters: {folder!r} is not a folder of per-class deltas (fusionloader erase --out)")
            names = class_names_of(source)
            if names is None:
                raise ValueError(f"adapters: a folder ({folder!r}) needs the class names of the dataset (dataset.classes) "
                                 "to find each class's file; pass ClassAdapters({label: file}) instead")
            found = deltas_in(folder, names)
            if not found:
                raise ValueError(f"adapters: folder {folder!r} holds no <class name>.safetensors for any of the "
                                 f"classes {list(names.values())[:10]}")
            adapters = ClassAdapters(found)
        elif not isinstance(adapters, ClassAdapters):
            raise TypeError(f"adapters must be a ClassAdapters or a folder of per-class deltas, got {type(adapters).__name__}")
    if clip_filter is not None:
        if not isinstance(clip_filter, ClipFilter):
            raise TypeError(f"clip_filter must be a fusionloader.engine.clip_filter.ClipFilter, got {type(clip_filter).__name__}")
        if clip_filter.class_names is None:
            names = names if names is not None else class_names_of(source)
            if names is not None:  # else string labels name themselves (checked when scored)
                clip_filter = clip_filter.with_class_names(names)
    return adapters, clip_filter
