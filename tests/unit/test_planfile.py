"""Release files: JSON and YAML read to the same plan (JSON by the JSON parser, YAML by libyaml where PyYAML has it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from reactor.errors import InvalidInput
from reactor.events import ReleasePlan
from reactor.planfile import load_plan

pytestmark = pytest.mark.unit

DOCUMENT = {
    "release_id": "shop-1",
    "service": "api",
    "version": "1.2.3",
    "package": {"url": "dist/api-1.2.3.tgz", "sha256": "ab" * 32},
    "strategy": {"batches": [1, "50%"], "max_parallel": 2},
    "nodes": [{"node_key": f"local/h{index}/api", "labels": {"zone": f"z{index % 2}"}} for index in range(5)],
}


def test_a_plan_reads_the_same_from_json_yaml_and_a_yaml_flow_mapping(tmp_path: Path) -> None:
    files = {
        "plan.json": json.dumps(DOCUMENT),
        "plan.yaml": yaml.safe_dump(DOCUMENT),
        # A flow mapping: YAML, not JSON (unquoted keys), though it starts as JSON does.
        "flow.yaml": "{release_id: shop-1, service: api, version: 1.2.3, "
        + "package: {url: dist/api-1.2.3.tgz, sha256: "
        + "ab" * 32
        + "}, strategy: {batches: [1, 50%], max_parallel: 2}, nodes: ["
        + ", ".join(f"{{node_key: local/h{index}/api, labels: {{zone: z{index % 2}}}}}" for index in range(5))
        + "]}",
    }
    plans: list[ReleasePlan] = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        plans.append(load_plan(tmp_path / name))
    assert plans[0] == plans[1] == plans[2]
    assert plans[0].package is not None
    assert plans[0].package.url == (tmp_path / "dist/api-1.2.3.tgz").as_uri(), "a relative URL is the file's"
    assert [node.labels["zone"] for node in plans[0].nodes] == ["z0", "z1", "z0", "z1", "z0"]


@pytest.mark.parametrize("text", ["{release_id: [unclosed", "release_id: shop-1\n  nodes: - x\n", '{"a": 1,,}'])
def test_a_file_neither_json_nor_yaml_is_refused_naming_it(tmp_path: Path, text: str) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text(text)
    with pytest.raises(InvalidInput, match="not valid YAML or JSON") as refused:
        load_plan(file)
    assert refused.value.field == str(file)


def test_a_json_plan_with_a_broken_field_names_it(tmp_path: Path) -> None:
    file = tmp_path / "plan.json"
    file.write_text(json.dumps({**DOCUMENT, "version": "$(id)"}))
    with pytest.raises(InvalidInput) as refused:
        load_plan(file)
    assert refused.value.field == "version"
