"""The control plane's collector policy: survivors of a large build are frozen (full
collections skip them), and collected, cycles included, once the control plane is quiet,
or before a freeze when the last full collection is too old."""

from __future__ import annotations

import gc
import weakref

from control_plane import gc_pause


class Node:
    pass


def frozen_cycle() -> weakref.ref:
    """A cycle (only the collector frees it) that a freeze caught, then dropped."""
    node = Node()
    node.loop = node
    ref = weakref.ref(node)
    gc_pause.freeze_survivors()
    return ref


def test_frozen_cycles_survive_collections_until_the_quiet_collection():
    try:
        ref = frozen_cycle()
        gc.collect()
        assert ref() is not None  # frozen: a full collection did not scan it
        gc_pause.collect_when_quiet()
        assert ref() is None and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_a_freeze_long_after_the_last_full_collection_collects_first(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(gc_pause, "clock", lambda: now[0])
    try:
        gc_pause.collect_when_quiet()  # the last full collection: at 0
        ref = frozen_cycle()
        now[0] = gc_pause.FULL_COLLECTION_EVERY - 1
        gc_pause.freeze_survivors()
        assert ref() is not None  # still within the bound: kept frozen
        now[0] = gc_pause.FULL_COLLECTION_EVERY + 1
        gc_pause.freeze_survivors()
        assert ref() is None
    finally:
        gc.unfreeze()
