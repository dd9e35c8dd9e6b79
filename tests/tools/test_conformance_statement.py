"""The DICOM Conformance Statement agrees with the code: its generated tables are written anew
from the archive's own lists and must equal what the document holds."""

from __future__ import annotations

import re

import pytest

from ricord_archive.dimse import server as dimse_server
from ricord_archive.tools import conformance
from tests import REPO

DOCUMENT = REPO / "docs" / "conformance-statement.md"
REGENERATE = "python -m ricord_archive.tools.conformance"


def test_the_document_agrees_with_the_code():
    text = DOCUMENT.read_text(encoding="utf-8")
    assert conformance.render(text) == text, f"the statement is stale: run `{REGENERATE}`"


def test_every_generated_table_is_in_the_document_and_filled():
    text = DOCUMENT.read_text(encoding="utf-8")
    for name, build in conformance.SECTIONS.items():
        block = re.search(rf"<!-- BEGIN GENERATED {name} -->\n(.*?)<!-- END GENERATED {name} -->",
                          text, re.DOTALL)
        assert block is not None, name
        assert block.group(1) == build() and block.group(1).count("\n") > 2, name


def test_the_tables_name_what_the_archive_runs_on():
    storage = conformance.storage_sop_classes()
    assert "| CT Image Storage | `1.2.840.10008.5.1.4.1.1.2` | yes | yes | by default |" in storage
    assert "never (secondary-capture)" in storage and "never (ultrasound)" in storage
    syntaxes = conformance.accepted_transfer_syntaxes()
    assert all(f"`{uid}`" in syntaxes for uid in dimse_server.TRANSFER_SYNTAXES)
    resources = conformance.dicomweb_resources()
    assert "| WADO-RS | GET | `/dicom-web/studies/{study}/series/{series}/instances/{instance}" \
           "/bulkdata/{tag}` |" in resources
    codes = conformance.deidentification_codes()
    assert [row.split("|")[1].strip() for row in codes.splitlines()[2:]] == [
        "`113100`", "`113107`", "`113108`", "`113109`"
    ]


def test_a_change_in_the_code_makes_the_document_stale(monkeypatch, tmp_path):
    text = DOCUMENT.read_text(encoding="utf-8")
    monkeypatch.setattr(dimse_server, "TRANSFER_SYNTAXES", dimse_server.TRANSFER_SYNTAXES[:-1])
    assert conformance.render(text) != text
    copy = tmp_path / "statement.md"
    copy.write_text(text, encoding="utf-8")
    assert conformance.main([str(copy), "--check"]) == 1
    assert copy.read_text(encoding="utf-8") == text  # --check never writes
    assert conformance.main([str(copy)]) == 0
    assert conformance.main([str(copy), "--check"]) == 0
    assert "RLE Lossless" not in copy.read_text(encoding="utf-8").split(
        "accepted-transfer-syntaxes -->")[1].split("<!-- END")[0]


def test_a_missing_block_is_an_error():
    text = DOCUMENT.read_text(encoding="utf-8")
    without = re.sub(r"<!-- BEGIN GENERATED limits -->.*?<!-- END GENERATED limits -->", "",
                     text, flags=re.DOTALL)
    with pytest.raises(ValueError, match="limits"):
        conformance.render(without)
