"""The control plane's collector policy: survivors of a large build are frozen (full
collections skip them), and collected, cycles included, once the control plane is quiet."""

from __future__ import annotations

import gc
import weakref

from control_plane.gc_pause import collect_when_quiet, freeze_survivors


class Node:
    pass


def test_frozen_cycles_survive_collections_until_the_quiet_collection():
    node = Node()
    node.loop = node  # a cycle: only the collector frees it
    ref = weakref.ref(node)
    try:
        freeze_survivors()
        del node
        gc.collect()
        assert ref() is not None  # frozen: a full collection did not scan it
        collect_when_quiet()
        assert ref() is None
        assert gc.get_freeze_count() > 0  # the survivors are frozen again
    finally:
        gc.unfreeze()
