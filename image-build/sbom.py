"""The CycloneDX SBOM (JSON, spec 1.5) of the image's Python environment.

    sbom.py --inventory INVENTORY.json --lock image.lock --name NAME --version V --output OUT

INVENTORY is what `kiosk-layer.sh --inside` wrote in the image: `pip inspect` of the /opt/kiosk
venv (its own packages and the Debian ones it sees), each Debian one with its package. A wheel
from the lock carries the sha256 the image installed it by; a Debian one its pkg:deb purl, so a
scanner matches it against Debian's security tracker rather than PyPI's versions.
Standard library only: it runs with whatever Python builds the image.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

SPEC_VERSION = "1.5"
VENV = "/opt/kiosk"
LICENSE_CLASSIFIER = "License :: OSI Approved :: "


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (version, sha256) from a `name==version --hash=sha256:...` requirements file."""
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    pinned: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([A-Za-z0-9._-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if match:
            pinned[canonical(match.group(1))] = (match.group(2), match.group(3))
    return pinned


def purl_version(version: str) -> str:
    """A version as a package URL spells it: "+" and ":" (Debian's epochs) percent-encoded."""
    return urllib.parse.quote(version, safe="")


def licenses(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    expression = metadata.get("license_expression")
    if expression:
        return [{"expression": expression}]
    names = [
        classifier[len(LICENSE_CLASSIFIER) :]
        for classifier in metadata.get("classifier", [])
        if classifier.startswith(LICENSE_CLASSIFIER)
    ]
    text = (metadata.get("license") or "").strip()
    if not names and text and "\n" not in text and len(text) <= 80:
        names = [text]
    return [{"license": {"name": name}} for name in names]


def requirement_names(metadata: dict[str, Any]) -> set[str]:
    """The names a distribution requires unconditionally (extras' requirements left out)."""
    names = set()
    for requirement in metadata.get("requires_dist", []):
        if re.search(r"extra\s*==", requirement):
            continue
        match = re.match(r"\s*([A-Za-z0-9._-]+)", requirement)
        if match:
            names.add(canonical(match.group(1)))
    return names


def component(dist: dict[str, Any], pinned: dict[str, tuple[str, str]]) -> dict[str, Any]:
    metadata = dist["metadata"]
    name, version = metadata["name"], metadata["version"]
    location = dist.get("metadata_location", "")
    properties = [{"name": "kiosk:python:location", "value": location}]
    debian = dist.get("debian")
    if debian:
        purl = (
            f"pkg:deb/debian/{debian['package']}@{purl_version(debian['version'])}"
            f"?arch={debian['architecture']}"
        )
        properties.append({"name": "kiosk:installed-by", "value": "debian"})
        properties.append({"name": "kiosk:debian:package", "value": debian["package"]})
    else:
        purl = f"pkg:pypi/{canonical(name)}@{purl_version(version)}"
        source = "pip"
        if location.startswith(VENV) and canonical(name) in pinned:
            source = "pip (image.lock)"
        elif canonical(name) == "kiosk":
            source = "pip (built from this repository)"
        properties.append({"name": "kiosk:installed-by", "value": source})
    entry: dict[str, Any] = {
        "type": "application" if canonical(name) == "kiosk" else "library",
        "bom-ref": purl,
        "name": name,
        "version": version,
        "purl": purl,
    }
    if metadata.get("summary"):
        entry["description"] = metadata["summary"]
    lock_entry = pinned.get(canonical(name))
    if not debian and lock_entry and lock_entry[0] == version:
        entry["hashes"] = [{"alg": "SHA-256", "content": lock_entry[1]}]
    found = licenses(metadata)
    if found:
        entry["licenses"] = found
    entry["properties"] = properties
    return entry


def build(
    inventory: dict[str, Any], pinned: dict[str, tuple[str, str]], name: str, version: str
) -> dict[str, Any]:
    dists = sorted(inventory["installed"], key=lambda dist: canonical(dist["metadata"]["name"]))
    components = [component(dist, pinned) for dist in dists]
    refs = {
        canonical(dist["metadata"]["name"]): entry["bom-ref"]
        for dist, entry in zip(dists, components, strict=True)
    }
    image_ref = f"kiosk-image:{name}"
    dependencies = [{"ref": image_ref, "dependsOn": sorted(refs.values())}]
    for dist, entry in zip(dists, components, strict=True):
        wanted = requirement_names(dist["metadata"])
        dependencies.append(
            {"ref": entry["bom-ref"], "dependsOn": sorted(refs[n] for n in wanted if n in refs)}
        )
    environment = inventory.get("environment", {})
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch
        else datetime.datetime.now(datetime.UTC)
    )
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": uuid.uuid4().urn,
        "version": 1,
        "metadata": {
            "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {
                "components": [
                    {
                        "type": "application",
                        "name": "kiosk image-build sbom.py",
                        "description": "pip inspect of the image's venv, with Debian's packages",
                    }
                ]
            },
            "component": {
                "type": "firmware",
                "bom-ref": image_ref,
                "name": name,
                "version": version,
                "description": f"Python environment of the kiosk image ({VENV})",
            },
            "properties": [
                {
                    "name": "kiosk:python:version",
                    "value": environment.get("python_full_version", ""),
                },
                {"name": "kiosk:python:machine", "value": environment.get("platform_machine", "")},
                {"name": "kiosk:pip:version", "value": inventory.get("pip_version", "")},
            ],
        },
        "components": components,
        "dependencies": dependencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", type=Path, required=True)
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    inventory = json.loads(args.inventory.read_text(encoding="utf-8"))
    bom = build(inventory, read_lock(args.lock), args.name, args.version)
    args.output.write_text(json.dumps(bom, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
