"""The documentation holds together: every link inside README.md and docs/ lands on a heading or a file
that exists, and every setting the operator reads is in both configuration tables."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import yaml

from chainguard_identity_operator.config import PREFIX, Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """GitHub's slug: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    text = re.sub(r"`", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    prose = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {anchor(h) for h in HEADING.findall(prose)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_lands(doc: pathlib.Path) -> None:
    prose = FENCE.sub("", doc.read_text(encoding="utf-8"))
    dead = []
    for target in LINK.findall(prose):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, fragment = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        missing_heading = bool(fragment) and path.suffix == ".md" and fragment not in anchors(path)
        if not path.exists() or missing_heading:
            dead.append(target)
    assert dead == [], f"{doc.name}: links to nothing"


def test_every_setting_is_documented_in_both_tables() -> None:
    names = {f"{PREFIX}{field.name.upper()}" for field in dataclasses.fields(Settings)}
    for doc in (ROOT / "README.md", ROOT / "docs" / "ADMIN.md"):
        text = doc.read_text(encoding="utf-8")
        missing = sorted(name for name in names if f"`{name}`" not in text)
        assert missing == [], f"{doc.name} does not document {missing}"


@pytest.mark.parametrize("doc", [ROOT / "README.md", ROOT / "docs" / "ADMIN.md"], ids=lambda p: p.name)
def test_the_sample_table_has_the_columns_kubectl_prints(doc: pathlib.Path) -> None:
    """kubectl prints NAMESPACE, NAME, then the CRD's printer columns upper-cased (the differential
    test holds the emulator's table to the real server's)."""
    crd = yaml.safe_load((ROOT / "crds" / "chainguardidentity.yaml").read_text(encoding="utf-8"))
    (version,) = crd["spec"]["versions"]
    columns = ["NAMESPACE", "NAME", *(c["name"].upper() for c in version["additionalPrinterColumns"])]
    sample = doc.read_text(encoding="utf-8").split("$ kubectl get cgid -A\n", 1)[1].splitlines()
    assert re.split(r"\s{2,}", sample[0].strip()) == columns
    for row in sample[1:3]:
        identity = row.split()[2]
        assert re.fullmatch(r"[0-9a-f]{40}/[0-9a-f]{16}", identity), "kubectl prints the whole UIDP"
