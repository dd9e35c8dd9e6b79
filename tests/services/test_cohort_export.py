"""The pure parts of cohorts: definitions checked, the NBIA manifest, ZIP entry names,
metadata.csv rows."""

from __future__ import annotations

import csv
import io

import pytest

from ricord_archive.errors import BadRequest
from ricord_archive.services.cohort_export import (
    METADATA_COLUMNS,
    SeriesRow,
    entry_names,
    manifest,
    metadata_csv,
    parse_spec,
)


def test_a_definition_is_checked_and_values_become_strings():
    spec = parse_spec({"name": "covid ct_1.a", "license": "CC0",
                       "filters": {"Modality": "CT", "Age": 18}})
    assert spec.filters == {"Modality": "CT", "Age": "18"}
    assert (spec.description, spec.license, spec.citation) == ("", "CC0", "")


@pytest.mark.parametrize("body", [
    [], {"filters": {}}, {"name": ""}, {"name": "a/b"}, {"name": "-x"}, {"name": "x" * 101},
    {"name": "x", "filters": {"Age": True}}, {"name": "x", "filters": {"Age": [1]}},
    {"name": "x", "license": 3}, {"name": "x", "citation": "a\x00b"},
    {"name": "x", "filters": {f"k{i}": "1" for i in range(65)}},
])
def test_bad_definitions(body):
    with pytest.raises(BadRequest):
        parse_spec(body)


def test_manifest_is_the_data_retrievers_format():
    text = manifest("https://a.example/api/cohorts/3/archive.zip", "ct", ["2.25.1", "2.25.2"])
    assert text.decode() == (
        "downloadServerUrl=https://a.example/api/cohorts/3/archive.zip\nincludeAnnotation=true\n"
        "noOfrRetry=4\ndatabasketId=ct.tcia\nmanifestVersion=3.0\nListOfSeriesToDownload=\n"
        "2.25.1\n2.25.2\n"
    )


def test_entries_are_numbered_within_their_series():
    assert entry_names(["s/a/x", "s/a/x", "s/a/y", "s/a/x"]) == [
        "s/a/x/000001.dcm", "s/a/x/000002.dcm", "s/a/y/000001.dcm", "s/a/x/000003.dcm"]


def test_metadata_csv_row():
    row = SeriesRow(
        study_json={"0020000D": {"vr": "UI", "Value": ["2.25.7"]},
                    "00080020": {"vr": "DA", "Value": ["20200317"]}},
        series_json={"0020000E": {"vr": "UI", "Value": ["2.25.8"]},
                     "00080060": {"vr": "CS", "Value": ["CT"]}},
        instance_json={"00080070": {"vr": "LO", "Value": ["ACME"]}},
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", subject="424242-000001", images=3,
        size_bytes=1234,
    )
    [parsed] = list(csv.DictReader(io.StringIO(metadata_csv("ricord", [row]).decode())))
    assert tuple(parsed) == METADATA_COLUMNS
    assert parsed == {
        "Series UID": "2.25.8", "Collection": "ricord", "Subject ID": "424242-000001",
        "Study UID": "2.25.7", "Study Description": "", "Study Date": "03-17-2020",
        "Series Description": "", "Manufacturer": "ACME", "Modality": "CT",
        "SOP Class Name": "CT Image Storage", "SOP Class UID": "1.2.840.10008.5.1.4.1.1.2",
        "Number of Images": "3", "File Size": "1234",
        "File Location": "./424242-000001/2.25.7/2.25.8",
    }
