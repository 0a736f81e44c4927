"""Golden files, after Envoy Gateway's translator tests: each routing file in
`testdata/translate/in/` translates to the Envoy resources in `testdata/translate/out/`, one
JSON file per xDS kind
(`<case>.clusters|endpoints|listeners|scoped_routes|routes|extension_configs.json`).

After an intended change of the output, `pytest tests/test_translate_golden.py
--update-golden` rewrites the files; the diff is then the review of the change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from control_plane.config import parse
from control_plane.translate import translate

DATA = Path(__file__).parent / "testdata" / "translate"
CASES = sorted(p.stem for p in (DATA / "in").glob("*.yaml"))
KINDS = ("clusters", "endpoints", "listeners", "scoped_routes", "routes", "extension_configs")


def render(resources: dict[str, Message]) -> str:
    """Resources by name as protobuf JSON (Envoy's field names), keys sorted."""
    named = {
        name: MessageToDict(message, preserving_proto_field_name=True)
        for name, message in resources.items()
    }
    return json.dumps(named, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("case", CASES)
def test_translation_matches_golden_files(case: str, request: pytest.FixtureRequest):
    source = DATA / "in" / f"{case}.yaml"
    resources = translate(parse(source.read_text(), str(source)))
    for kind in KINDS:
        golden = DATA / "out" / f"{case}.{kind}.json"
        actual = render(getattr(resources, kind))
        if request.config.getoption("--update-golden"):
            golden.write_text(actual)
            continue
        assert golden.exists(), f"{golden} is missing: run pytest --update-golden, review it"
        assert json.loads(actual) == json.loads(golden.read_text()), f"{case}: {kind} differ"


def test_every_golden_file_belongs_to_a_case():
    expected = {f"{case}.{kind}.json" for case in CASES for kind in KINDS}
    assert {p.name for p in (DATA / "out").iterdir()} <= expected
    assert len(CASES) >= 9
