"""Build the example service's packages and release files into examples/dist/ (nothing binary is committed).

python examples/build.py            # then: reactor release submit examples/dist/release-hello-1.0.0.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from reactor.demo import build_package
from reactor.demo.scenario import NODES, release_plan


def main() -> None:
    """Write hello-<version>.tar.gz, SHA256SUMS and three release files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "dist")
    parser.add_argument("--base-port", type=int, default=18081, help="node-1 listens here, node-2 on the next port...")
    args = parser.parse_args()
    out: Path = args.out
    packages = {version: build_package(out, version) for version in ("1.0.0", "1.1.0", "1.2.0")}
    (out / "SHA256SUMS").write_text("".join(f"{p.sha256}  {p.path.name}\n" for p in packages.values()))
    ports = {node: args.base_port + index for index, node in enumerate(NODES)}
    plans = {
        "release-hello-1.0.0.yaml": release_plan("hello-1.0.0", packages["1.0.0"], ports),
        "release-hello-1.1.0.yaml": release_plan("hello-1.1.0", packages["1.1.0"], ports),
        "release-hello-1.2.0-bad.yaml": release_plan("hello-1.2.0-bad", packages["1.2.0"], ports, bad_node=NODES[0]),
    }
    for name, plan in plans.items():
        document = plan.model_dump(mode="json", exclude_defaults=True)
        # Package URLs relative to the release file keep the files movable.
        document["package"]["url"] = f"hello-{plan.version}.tar.gz"
        for node in document["nodes"]:
            if "package" in node:
                node["package"]["url"] = f"hello-{plan.version}.tar.gz"
        (out / name).write_text(yaml.safe_dump(document, sort_keys=False))
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
