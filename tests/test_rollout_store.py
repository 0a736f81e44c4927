"""The state store: compare-and-set revisions, atomic files, shared by two instances."""

from __future__ import annotations

import pytest

from control_plane.state_store import Conflict, FileStateStore


def test_put_is_a_compare_and_set_on_the_revision(tmp_path):
    a, b = FileStateStore(tmp_path / "state"), FileStateStore(tmp_path / "state")
    assert a.get("rollout/iris") is None and not (tmp_path / "state").exists()
    assert a.put("rollout/iris", {"step": 1}, 0) == 1
    with pytest.raises(Conflict, match="expected revision 0, found 1"):
        b.put("rollout/iris", {"step": 9}, 0)
    assert b.put("rollout/iris", {"step": 2}, 1) == 2
    with pytest.raises(Conflict):
        a.put("rollout/iris", {"step": 3}, 1)  # a read revision 1, b wrote since
    stored = a.get("rollout/iris")
    assert (stored.value, stored.revision) == ({"step": 2}, 2)
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert files == [".lock", "rollout%2Firis.json"]


def test_keys_lists_the_stored_keys_with_a_prefix(tmp_path):
    store = FileStateStore(tmp_path / "state")
    assert store.keys("rollout/") == set()  # no directory yet
    store.put("rollout/iris", {"phase": "judging"}, 0)
    store.put("rollout/a b/c", {}, 0)
    store.put("other/iris", {}, 0)
    assert store.keys("rollout/") == {"rollout/iris", "rollout/a b/c"}
    assert store.keys("") == {"rollout/iris", "rollout/a b/c", "other/iris"}
