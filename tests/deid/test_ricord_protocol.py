"""The archive's PS3.15 table against the RICORD de-identification protocol's attribute list.

The RICORD protocol (Appendix I of tests/data/ricord_deid_protocol.txt) lists an
action per attribute; what it does not list it keeps, except groups 0032 to 4008, private
groups, curves and overlays, which it removes whole. Where RICORD is weaker than PS3.15 (it keeps
descriptions, some UIDs and the birth time, shifts the birth date, removes references), the
archive follows PS3.15. The differences are printed (run with -s) and recorded as properties.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

from ricord_archive.deid import DeidContext, Keyring, deidentify
from ricord_archive.deid.table import profile_table
from tests import DATA

PROTOCOL = DATA / "ricord_deid_protocol.txt"
SITE = "100001"
KEYS = Keyring(b"ricord-protocol-test-secret-0123")
ORIGINAL_UID = "1.2.826.0.1.3680043.10.1234.5.6.7"
_RULE = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)\s+(.+?)\s*$")


@dataclass(frozen=True)
class Rule:
    name: str
    action: str

    @property
    def kind(self) -> str:
        """remove, empty, hash (UIDs, dates, the accession number), pseudonym or set."""
        for prefix, kind in (("@remove", "remove"), ("@empty", "empty"), ("@hash", "hash"),
                             ("@param", "pseudonym")):
            if self.action.startswith(prefix):
                return kind
        return "set"


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword_for_tag(tag) or '?'}"


def protocol_text() -> str:
    return PROTOCOL.read_text(encoding="utf-8")


def parse_appendix_i(text: str) -> dict[int, Rule]:
    """Appendix I's lines such as '(0008,0050) AccessionNumber @hash(this,8)'."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"Appendix I\s*", line))
    end = next(i for i, line in enumerate(lines) if line.startswith("Appendix II"))
    rules = {}
    for line in lines[start:end]:
        match = _RULE.match(line)
        if not match:
            continue
        rest = match.group(3)
        if "@" in rest:
            name, action = rest[:rest.index("@")].strip(), rest[rest.index("@"):]
        else:
            name, action = rest.rsplit(" ", 1)
        rules[int(match.group(1) + match.group(2), 16)] = Rule(name, action)
    return rules


@pytest.fixture(scope="module")
def ricord() -> dict[int, Rule]:
    return parse_appendix_i(protocol_text())


def ricord_kind(rules: dict[int, Rule], tag: int) -> str:
    """What RICORD does to an attribute: its listed action, else its group rule, else keep."""
    if tag in rules:
        return rules[tag].kind
    return "remove (group)" if 0x0032 <= tag >> 16 <= 0x4008 else "keep"


def ps315_drops_original(action: str) -> bool:
    """X, Z, D and their compounds: the original value never survives. K, C, U keep or remap."""
    return not set(action) & set("KCU")


# --- the differences -----------------------------------------------------------------------


def ricord_keeps_what_ps315_removes(rules: dict[int, Rule]) -> list[int]:
    actions = profile_table().actions
    return sorted(t for t, a in actions.items()
                  if ps315_drops_original(a) and ricord_kind(rules, t) in ("keep", "hash"))


def ricord_does_not_remap_what_ps315_remaps(rules: dict[int, Rule]) -> list[int]:
    actions = profile_table().actions
    return sorted(t for t, a in actions.items() if "U" in a and ricord_kind(rules, t) != "hash")


def ps315_acts_on_what_ricord_does_not_list(rules: dict[int, Rule]) -> list[int]:
    return sorted(t for t, a in profile_table().actions.items() if a != "K" and t not in rules)


def test_the_ricord_list_is_parsed(ricord):
    assert len(ricord) == 408
    assert ricord[0x00080050] == Rule("AccessionNumber", "@hash(this,8)")
    assert ricord[0x00100020].kind == ricord[0x00100010].kind == "pseudonym"
    assert ricord[0x00081155].kind == "remove"
    assert ricord[0x00200052].kind == "hash"
    assert ricord[0x00120062] == Rule("PatientIdentityRemoved", "YES")


def test_report_the_differences(ricord, record_property):
    table = profile_table()
    sections = {
        "RICORD keeps or hashes, PS3.15 removes": ricord_keeps_what_ps315_removes(ricord),
        "PS3.15 remaps (U), RICORD does not": ricord_does_not_remap_what_ps315_remaps(ricord),
        "PS3.15 acts on, RICORD does not list": ps315_acts_on_what_ricord_does_not_list(ricord),
    }
    lines = []
    for title, tags in sections.items():
        record_property(title, len(tags))
        lines.append(f"== {title}: {len(tags)}")
        lines += [f"   {tag_text(t)}  PS3.15 {table.actions[t]}, RICORD {ricord_kind(ricord, t)}"
                  for t in tags]
    print("\n" + "\n".join(lines))
    keeps, not_remapped, unlisted = sections.values()
    assert {0x00081030, 0x0008103E, 0x00100030, 0x00100032} <= set(keeps)
    assert {0x00081155, 0x00080017, 0x00083010} <= set(not_remapped)
    assert 0x00080017 in unlisted and 0x00081155 not in unlisted


# --- where PS3.15 wins: checked with the engine --------------------------------------------


def deidentified(ds: Dataset) -> Dataset:
    ds.SOPClassUID = CTImageStorage
    return deidentify(ds, DeidContext(SITE, f"{SITE}-000001", -30, KEYS))


def test_ricord_removes_references_the_archive_remaps_them(ricord):
    assert ricord[0x00081155].kind == "remove"
    assert profile_table().actions[0x00081155] == "U"
    referenced = Dataset()
    referenced.SOPInstanceUID = ORIGINAL_UID
    referenced = deidentified(referenced)
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = ORIGINAL_UID
    referencing = Dataset()
    referencing.SOPInstanceUID = "1.2.826.0.1.3680043.10.1234.5.6.8"
    referencing.ReferencedImageSequence = [item]
    out = deidentified(referencing).ReferencedImageSequence[0]
    assert out.ReferencedSOPInstanceUID == referenced.SOPInstanceUID
    assert out.ReferencedSOPInstanceUID.startswith("2.25.")


def test_descriptions_ricord_keeps_are_removed(ricord):
    text = protocol_text()
    clean_descriptors = text[text.index("113105 Clean Descriptors"):text.index("113106")]
    ds = Dataset()
    for tag in (0x00081030, 0x0008103E):
        assert tag not in ricord and f"({tag >> 16:04x},{tag & 0xFFFF:04x})" in \
            clean_descriptors.lower()
        assert profile_table().actions[tag] == "X"
        ds.add_new(tag, "LO", "Chest CT of John Doe, Springfield")
    out = deidentified(ds)
    assert 0x00081030 not in out and 0x0008103E not in out


def test_uids_ricord_keeps_unchanged_are_remapped(ricord):
    assert ricord_kind(ricord, 0x00080017) == "keep"  # Acquisition UID, not listed
    ds = Dataset()
    ds.AcquisitionUID = ORIGINAL_UID
    assert deidentified(ds).AcquisitionUID == KEYS.uid(SITE, ORIGINAL_UID)


def test_birth_date_ricord_shifts_is_emptied_and_birth_time_removed(ricord):
    assert ricord[0x00100030].kind == "hash"
    assert ricord_kind(ricord, 0x00100032) == "keep"
    ds = Dataset()
    ds.PatientBirthDate, ds.PatientBirthTime = "19450312", "081500"
    out = deidentified(ds)
    assert out.PatientBirthDate in (None, "") and "PatientBirthTime" not in out


def planted(vr: str) -> object:
    values = {"DA": "19450312", "TM": "081500", "DT": "19450312081500", "UI": ORIGINAL_UID,
              "AS": "045Y", "IS": "7", "DS": "7.5", "US": 7, "SS": 7, "UL": 7, "SL": 7}
    if vr == "SQ":
        item = Dataset()
        item.PersonName = "Doe^Jane"
        item.ContentDescription = "SECRET DESCRIPTION"
        return Sequence([item])
    return values.get(vr, "SECRET VALUE 42")


def test_nothing_ricord_keeps_that_ps315_removes_survives(ricord):
    """Every attribute RICORD keeps or hashes and PS3.15 removes: its original value is gone."""
    survivors = []
    for tag in ricord_keeps_what_ps315_removes(ricord):
        vr = dictionary_VR(tag).split(" or ")[0]
        ds = Dataset()
        ds.add_new(tag, vr, planted(vr))
        original = ds[tag].value if vr != "SQ" else None
        out = deidentified(ds)
        if tag not in out:
            continue
        value = out[tag].value
        if vr == "SQ":
            kept = any("PersonName" in i or "ContentDescription" in i for i in value)
        else:
            kept = value == original
        if kept:
            survivors.append(tag_text(tag))
    assert survivors == []


def test_uids_ps315_remaps_are_remapped_not_removed(ricord):
    """Every UI attribute PS3.15 remaps (file meta aside, rebuilt at write): remapped, kept."""
    wrong = []
    for tag in ricord_does_not_remap_what_ps315_remaps(ricord):
        if tag >> 16 == 0x0002 or dictionary_VR(tag) != "UI":
            continue
        ds = Dataset()
        ds.add_new(tag, "UI", ORIGINAL_UID)
        out = deidentified(ds)
        if tag not in out or out[tag].value != KEYS.uid(SITE, ORIGINAL_UID):
            wrong.append(tag_text(tag))
    assert wrong == []
