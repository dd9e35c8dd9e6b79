"""Expert labels (issue #15): RICORD's schema, an MD.ai export written here (three readers on
radiographs, freeform CT outlines over several slices, global and local labels, an annotation
on a UID the archive does not hold) imported into a running archive with ingested studies; the
round trip through MD.ai's export shape; the consensus; cohorts by label; reader codes (no
MD.ai user id, e-mail or dropped note anywhere in PostgreSQL, the files, the log or an answer);
the roles."""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess

import pydicom
import pytest
import requests
from pydicom.sr.codedict import codes

from ricord_archive.deid import Keyring
from ricord_archive.labels import mdai
from ricord_archive.labels.consensus import consensus
from ricord_archive.labels.model import LabelType, Scope
from ricord_archive.labels.schema import private_code, shipped_schema
from tests import dcmtk, leaks
from tests.conftest import Archive, every_instance
from tests.ct_phantom import ct_series
from tests.labels import test_label_dicom as label_dicom
from tests.web.test_auth import CONFIG as AUTH_CONFIG
from tests.web.test_auth import TOKENS, sha

pytestmark = pytest.mark.slow  # a server process per test

CONFIG = '[[sites]]\nname = "labels-site"\nsiteid = "515151"\naets = ["STORESCU"]\n'
READERS = {  # MD.ai user id -> e-mail: people, never to be stored
    "U_Rd9KxQ71": "ann.reader@hospital.example",
    "U_Zm3Lp0Vb": "bob.reader@hospital.example",
    "U_Wq8Tn5Hc": "cat.reader@hospital.example",
}
DROPPED_NOTE = "NOTE-LEAK-4471 patient looked unwell"
READER_NAME = "Dr Needle Readerson"
KEYS = Keyring(b"0123456789abcdef0123456789abcdef")


# --- the pure part ----------------------------------------------------------------------------

def test_ricord_schema_ships_with_real_codes():
    schema = shipped_schema("ricord")
    names = {label.name: label for label in schema.labels}
    assert {"Typical Appearance", "Indeterminate Appearance", "Atypical Appearance",
            "Negative for Pneumonia", "Mild", "Moderate", "Severe", "Endotracheal tube",
            "Central venous catheter", "Pacemaker", "Feeding tube", "Adequate",
            "Motion artifact", "Incomplete", "Infectious opacity",
            "Infectious TIB/micronodules", "Atelectasis", "Other noninfectious opacity",
            "Noninfectious nodule/mass", "Infectious cavity"} == set(names)
    assert len({label.id for label in schema.labels}) == len(schema.labels)
    assert {label.group_id for label in schema.labels} == {g.id for g in schema.groups}
    local = {n for n, label in names.items() if label.type is LabelType.LOCAL}
    assert all(names[n].scope is Scope.INSTANCE and names[n].mode == "freeform" for n in local)
    assert len(local) == 6
    # the SNOMED CT codes are those DICOM PS3.16 gives (pydicom's dictionary), and Atelectasis
    sct = {(label.name, label.code.value, label.code.meaning) for label in schema.labels
           if label.code.scheme == "SCT"}
    assert sct == {("Atelectasis", "46621007", "Atelectasis"), *(
        (name, c.value, c.meaning) for name, c in (
            ("Mild", codes.SCT.Mild), ("Moderate", codes.SCT.Moderate),
            ("Severe", codes.SCT.Severe), ("Endotracheal tube", codes.SCT.EndotrachealTube),
            ("Central venous catheter", codes.SCT.CentralVenousCatheter),
            ("Pacemaker", codes.SCT.CardiacPacemaker), ("Feeding tube", codes.SCT.FeedingTube),
        ))}
    assert all(label.code.scheme in ("SCT", "99RICORD") for label in schema.labels)


def _reader_entry(user: str, email: bool = False) -> dict:
    return {"createdByEmail": READERS[user]} if email else {
        "createdById": user, "createdByEmail": READERS[user], "createdByName": READER_NAME}


def test_parse_refuses_by_position_and_keys_readers():
    label = {"id": "L_g1", "name": "Typical Appearance", "scope": "EXAM", "type": "GLOBAL"}
    local = {"id": "L_l1", "name": "Outline", "scope": "INSTANCE", "type": "LOCAL",
             "annotationMode": "freeform", "color": "#FF0000"}
    study, series, sop = "2.25.1", "2.25.2", "2.25.3"
    good = {"id": "A_1", "labelId": "L_g1", "StudyInstanceUID": study, "note": DROPPED_NOTE,
            "createdAt": "2020-08-11T19:40:26.547Z", **_reader_entry("U_Rd9KxQ71")}
    outline = {"id": "A_2", "labelId": "L_l1", "StudyInstanceUID": study,
               "SeriesInstanceUID": series, "SOPInstanceUID": sop, "frameNumber": 0,
               "data": {"vertices": [[1, 2], [3, 4], [5, 6]]}, **_reader_entry("U_Zm3Lp0Vb")}
    by_mail = {**good, "id": "A_3", **_reader_entry("U_Rd9KxQ71", email=True)}
    by_mail.pop("createdById")
    bad = [
        {**good, "id": "A_4", "labelId": "L_nope"},
        {**good, "id": "A_5", "StudyInstanceUID": "not a uid"},
        {**outline, "id": "A_6", "SOPInstanceUID": None},
        {**outline, "id": "A_7", "data": None},
        {**outline, "id": "A_8", "frameNumber": -1},
        {k: v for k, v in good.items() if k not in ("createdById", "createdByEmail")},
        {**good, "createdAt": "yesterday-ish"},
        good,
    ]
    document = {"labelGroups": [{"id": "G_1", "name": "G", "labels": [
        label, local, {"id": "L_bad", "name": "x", "scope": "PATIENT", "type": "GLOBAL"},
        {**label, "id": "L_kid", "parentId": "L_orphan"},
        {**label, "id": "L_grandkid", "parentId": "L_kid"}, label]},
        {"id": "G_1", "name": "again", "labels": []}],
        "datasets": [{"id": "D_1", "annotations": [good, outline, by_mail, *bad]}]}
    parsed = mdai.parse_export(document, KEYS, {}, private_code)
    assert [r.as_dict() for r in parsed.refusals] == [
        {"position": "labelGroups[0].labels[2]", "reason": "invalid-label"},
        {"position": "labelGroups[0].labels[5]", "reason": "duplicate-id"},
        {"position": "labelGroups[1]", "reason": "duplicate-id"},
        {"position": "labelGroups[0].labels[3]", "reason": "unknown-parent"},
        {"position": "labelGroups[0].labels[4]", "reason": "unknown-parent"},
        *({"position": f"datasets[0].annotations[{n}]", "reason": reason}
          for n, reason in enumerate(["unknown-label", "invalid-uid", "missing-uid",
                                      "invalid-geometry", "invalid-frame", "missing-reader",
                                      "invalid-time", "duplicate-id"], start=3)),
    ]
    first, second, third = (x.annotation for x in parsed.annotations)
    assert parsed.labels[0].scope is Scope.STUDY and parsed.labels[1].colour == "#ff0000"
    assert second.frame == 1 and second.sop_uid == sop and second.note is None
    assert first.reader == mdai.reader_code(KEYS, "U_Rd9KxQ71") != second.reader
    assert third.reader == mdai.reader_code(KEYS, READERS["U_Rd9KxQ71"])
    assert all(mdai.READER_CODE.fullmatch(a.reader) for a in (first, second, third))
    assert mdai.reader_code(Keyring(b"another secret key!!"), "U_Rd9KxQ71") != first.reader
    text = repr(parsed)
    assert not any(s in text for s in (*READERS, *READERS.values(), DROPPED_NOTE, READER_NAME))
    kept = mdai.parse_export(document, KEYS, {}, private_code, keep_notes=True)
    assert kept.annotations[0].annotation.note == DROPPED_NOTE
    # MD.ai's export shape read back gives the same labels and annotations
    again = mdai.parse_export(mdai.to_export(kept.groups, kept.labels,
                                             [x.annotation for x in kept.annotations]),
                              KEYS, {}, private_code, keep_notes=True)
    assert (again.groups, again.labels) == (kept.groups, kept.labels)
    assert [x.annotation for x in again.annotations] == [x.annotation for x in kept.annotations]
    with pytest.raises(mdai.ExportError):
        mdai.parse_export([], KEYS, {}, private_code)


def test_consensus_is_the_majority_of_the_readers():
    choices = [("1.1", "R-1", "Typical"), ("1.1", "R-2", "Typical"), ("1.1", "R-3", "Atypical"),
               ("1.1", "R-1", "Mild"), ("1.2", "R-1", "Negative"), ("1.2", "R-2", "Negative")]
    assert consensus(choices) == [
        {"StudyInstanceUID": "1.1",
         "readers": {"R-1": ["Mild", "Typical"], "R-2": ["Typical"], "R-3": ["Atypical"]},
         "majority": ["Typical"], "agreed": False},
        {"StudyInstanceUID": "1.2", "readers": {"R-1": ["Negative"], "R-2": ["Negative"]},
         "majority": ["Negative"], "agreed": True},
    ]


# --- end to end -------------------------------------------------------------------------------

def _instances(archive: Archive) -> dict[str, list[tuple[str, str]]]:
    """The archive's (de-identified) studies: study UID -> [(series UID, SOP UID)] in order."""
    found = every_instance(archive.client())
    studies: dict[str, list[tuple[str, str]]] = {}
    for item in found:
        studies.setdefault(item["0020000D"]["Value"][0], []).append(
            (item["0020000E"]["Value"][0], item["00080018"]["Value"][0]))
    return {k: sorted(v) for k, v in studies.items()}


GROUPS = [
    {"id": "G_appear01", "name": "Appearance", "labels": [
        {"id": "L_typ001", "name": "Typical Appearance", "scope": "EXAM", "type": "GLOBAL",
         "annotationMode": None, "color": "#D62728", "radlexTagIds": []},
        {"id": "L_ind001", "name": "Indeterminate Appearance", "scope": "EXAM",
         "type": "GLOBAL", "color": "#FF7F0E"},
        {"id": "L_neg001", "name": "Negative for Pneumonia", "scope": "EXAM", "type": "GLOBAL"},
    ]},
    {"id": "G_grade01", "name": "Grading", "labels": [
        {"id": "L_mod001", "name": "Moderate", "scope": "STUDY", "type": "GLOBAL"},
        {"id": "L_mil001", "name": "Mild", "scope": "STUDY", "type": "GLOBAL",
         "parentId": "L_mod001"},
    ]},
    {"id": "G_ct0001", "name": "CT opacities", "labels": [
        {"id": "L_opa001", "name": "Infectious opacity", "scope": "INSTANCE", "type": "LOCAL",
         "annotationMode": "freeform", "color": "#FF0000"},
        {"id": "L_ate001", "name": "Atelectasis", "scope": "INSTANCE", "type": "LOCAL",
         "annotationMode": "bbox"},
        {"id": "L_cus001", "name": "Custom finding", "scope": "SERIES", "type": "LOCAL",
         "annotationMode": "polygon"},
    ]},
]
U1, U2, U3 = READERS


def _export(studies: dict[str, list[tuple[str, str]]]) -> tuple[dict, dict[str, str]]:
    """An MD.ai export over the archive's studies: three readers on three radiographs, one
    reader's outlines on three CT slices; and the studies by role."""
    ct = next(uid for uid, items in studies.items() if len(items) == 4)
    cr1, cr2, cr3 = sorted(uid for uid in studies if uid != ct)
    annotations: list[dict] = []

    def add(label: str, study: str, reader: str, email_only: bool = False, **more) -> None:
        entry = {"id": f"A_{len(annotations):05d}", "labelId": label,
                 "StudyInstanceUID": study, "SeriesInstanceUID": None, "SOPInstanceUID": None,
                 "frameNumber": None, "data": None, "note": DROPPED_NOTE,
                 "createdAt": "2020-08-11T19:40:26.547Z", "updatedAt": "2020-08-12T08:00:00Z",
                 "updatedById": reader, **_reader_entry(reader, email_only), **more}
        if email_only:
            entry.pop("updatedById")
        annotations.append(entry)

    for reader, label in ((U1, "L_typ001"), (U2, "L_typ001"), (U3, "L_ind001")):
        add(label, cr1, reader)
        add("L_mod001", cr1, reader)
    for reader in READERS:
        add("L_neg001", cr2, reader)
    add("L_typ001", cr3, U1)
    add("L_ind001", cr3, U2)
    add("L_mil001", cr3, U3, email_only=True)  # a reader known by the e-mail alone
    for n, (series, sop) in enumerate(studies[ct][:3]):  # freeform outlines on three slices
        add("L_opa001", ct, U1, SeriesInstanceUID=series, SOPInstanceUID=sop,
            data={"vertices": [[4 + n, 4], [12, 4 + n], [12, 12], [4, 12]]})
    series, sop = studies[ct][1]
    add("L_ate001", ct, U2, SeriesInstanceUID=series, SOPInstanceUID=sop, frameNumber=0,
        data={"x": 2, "y": 3, "width": 5, "height": 4})
    add("L_cus001", ct, U2, SeriesInstanceUID=series,
        data={"foreground": [[[1, 1], [2, 1], [2, 2]]], "background": []})
    add("L_typ001", "2.25.999999999999999999", U1)  # a study the archive does not hold
    add("L_opa001", ct, U1, SeriesInstanceUID=series, SOPInstanceUID="2.25.31337",
        data={"vertices": [[1, 1], [2, 2], [1, 2]]})  # an instance it does not hold
    add("L_gone01", cr2, U1)  # a label neither the file nor the archive defines
    document = {"id": "P_ricord1", "name": "RICORD test", "labelGroups": GROUPS,
                "datasets": [{"id": "D_cxr001", "name": "CXR", "annotations": annotations[:12]},
                             {"id": "D_ct0001", "name": "CT", "annotations": annotations[12:]}]}
    return document, {"ct": ct, "cr1": cr1, "cr2": cr2, "cr3": cr3}


def _run(archive: Archive, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(archive.command(*args), capture_output=True, text=True, timeout=180)


def _scan(archive: Archive, answers: list[bytes], needles: set[bytes]) -> dict[str, set]:
    index = leaks.index_text(archive)
    assert b"R-" in index and b"vertices" in index  # the dump holds annotations
    return leaks.leaks(archive, index, answers, needles)


def test_mdai_export_in_and_out_of_a_running_archive(make_archive, corpus, tmp_path):
    archive = make_archive("labels", CONFIG)
    files = [*(f for day in (3, 4, 5) for f in corpus.study(
        corpus.patient(), dt.date(2020, 4, day), slices=1, modality="CR")),
        *corpus.study(corpus.patient(), dt.date(2020, 4, 6), slices=4)]
    sent = dcmtk.storescu(archive.dimse_port, files)
    assert sent.stderr.count("(Success)") == len(files), sent.stderr
    studies = _instances(archive)
    document, role = _export(studies)
    answers: list[bytes] = []

    schema = _run(archive, "labels", "init-schema", "ricord")
    again = _run(archive, "labels", "init-schema", "ricord")
    assert schema.stdout.strip() == "schema ricord: labels imported 20, updated 0, unchanged 0"
    assert again.stdout.strip() == "schema ricord: labels imported 0, updated 0, unchanged 20"

    path = tmp_path / "mdai_export.json"
    path.write_text(json.dumps(document))
    imported = _run(archive, "labels", "import", str(path))
    answers += [imported.stdout.encode(), imported.stderr.encode()]
    assert imported.returncode == 1, imported.stderr  # some annotations were not stored
    assert imported.stdout.splitlines() == [
        "labels: imported 8, updated 0, unchanged 0",
        "annotations: imported 17, updated 0, unchanged 0, refused 1 (1 unknown-label)",
        "2 annotations name images the archive does not hold (not stored)",
        "datasets[1].annotations[5]: not-in-archive",
        "datasets[1].annotations[6]: not-in-archive",
        "datasets[1].annotations[7]: unknown-label",
    ]

    api = f"{archive.root}/api/annotations"

    def get(url: str, **params: str) -> requests.Response:
        response = requests.get(url, params=params, timeout=60)
        answers.append(response.content)
        assert response.status_code == 200, response.text
        return response

    def post(body: bytes, **params: str) -> dict:
        response = requests.post(api, data=body, params=params, timeout=60,
                                 headers={"Content-Type": "application/json"})
        answers.append(response.content)
        assert response.status_code == 200, response.text
        return response.json()

    twice = post(path.read_bytes())  # importing the same file again changes nothing
    assert (twice["labels"], twice["annotations"], twice["notInArchive"], twice["refused"]) == (
        {"imported": 0, "updated": 0, "unchanged": 8},
        {"imported": 0, "updated": 0, "unchanged": 17}, 2, {"unknown-label": 1})
    assert twice["errors"][0] == {"position": "datasets[1].annotations[5]",
                                  "reason": "not-in-archive"}

    listed = get(api).json()
    assert len(listed) == 17
    readers = {a["reader"] for a in listed}
    assert len(readers) == 4  # three user ids, and the third reader once by e-mail alone
    assert all(mdai.READER_CODE.fullmatch(r) for r in readers)
    assert all(a["note"] is None for a in listed)
    ct = get(api, StudyInstanceUID=role["ct"]).json()
    assert sorted((a["label"], a["frameNumber"]) for a in ct) == [
        ("Atelectasis", 0), ("Custom finding", None), *[("Infectious opacity", None)] * 3]
    outlines = get(api, label="Infectious opacity").json()
    assert {a["SOPInstanceUID"]: a["data"] for a in outlines} == {
        sop: {"vertices": [[4 + n, 4], [12, 4 + n], [12, 12], [4, 12]]}
        for n, (_, sop) in enumerate(studies[role["ct"]][:3])}
    one = outlines[0]["reader"]
    assert {a["StudyInstanceUID"] for a in get(api, reader=one).json()} == {
        role["ct"], role["cr1"], role["cr2"], role["cr3"]}
    assert len(get(api, group="Grading").json()) == 4
    assert len(get(api, group="G_ct0001", SeriesInstanceUID=studies[role["ct"]][0][0])
               .json()) == 5
    assert requests.get(api, params={"PatientName": "x"}, timeout=30).status_code == 400

    label_list = get(f"{archive.root}/api/labels").json()
    coded = {lb["name"]: lb["code"] for g in label_list for lb in g["labels"]
             if g["id"].startswith("G_") and not g["id"].startswith("G_RICORD")}
    assert coded["Typical Appearance"] == {"scheme": "99RICORD", "value": "RIC001",
                                           "meaning": "Typical appearance for COVID-19 "
                                                      "pneumonia"}  # RICORD's, by name
    assert coded["Atelectasis"]["value"] == "46621007"
    assert coded["Custom finding"] == {"scheme": "99RICORD", "value": "L_cus001",
                                       "meaning": "Custom finding"}

    # import -> export -> import is the identity
    exported = get(f"{api}/export", format="mdai")
    first = exported.json()
    assert len(first["datasets"][0]["annotations"]) == 17
    back = post(exported.content)
    assert (back["labels"]["imported"], back["labels"]["updated"],
            back["annotations"]["imported"], back["annotations"]["updated"],
            back["annotations"]["unchanged"], back["errors"]) == (0, 0, 0, 0, 17, [])
    assert get(f"{api}/export").json() == first
    mine = get(f"{api}/export", format="mdai", StudyInstanceUID=role["cr2"]).json()
    assert len(mine["datasets"][0]["annotations"]) == 3

    # a corrected outline is updated; a note is kept only when asked for (never a dropped one:
    # it would linger in PostgreSQL's files)
    fixed = copy.deepcopy(document)
    for entry in fixed["datasets"][0]["annotations"] + fixed["datasets"][1]["annotations"]:
        entry["note"] = None
    fixed["datasets"][1]["annotations"][0]["data"] = {"vertices": [[1, 1], [9, 1], [9, 9]]}
    fixed["datasets"][0]["annotations"][0]["note"] = "kept note about the reading"
    corrected = post(json.dumps(fixed).encode())
    assert (corrected["annotations"]["updated"], corrected["annotations"]["unchanged"]) == (1, 16)
    noted = post(json.dumps(fixed).encode(), keep_notes="true")
    assert (noted["annotations"]["updated"], noted["annotations"]["unchanged"]) == (1, 16)
    reverted = post(path.read_bytes())  # the outline as it was; notes left as they are
    assert (reverted["annotations"]["updated"], reverted["annotations"]["unchanged"]) == (1, 16)
    notes = {a["id"]: a["note"] for a in get(api).json()}
    assert notes.pop("A_00000") == "kept note about the reading"
    assert set(notes.values()) == {None}

    # consensus of the three readers on the radiographs
    appearance = get(f"{archive.root}/api/labels/consensus", label_group="Appearance").json()
    by_study = {item["StudyInstanceUID"]: item for item in appearance}
    assert set(by_study) == {role["cr1"], role["cr2"], role["cr3"]}
    assert (by_study[role["cr1"]]["majority"], by_study[role["cr1"]]["agreed"]) == (
        ["Typical Appearance"], False)
    assert sorted(by_study[role["cr1"]]["readers"].values()) == [
        ["Indeterminate Appearance"], ["Typical Appearance"], ["Typical Appearance"]]
    assert (by_study[role["cr2"]]["majority"], by_study[role["cr2"]]["agreed"]) == (
        ["Negative for Pneumonia"], True)
    assert by_study[role["cr3"]]["majority"] == []  # two readers, two different labels
    every = {i["StudyInstanceUID"]: i for i in
             get(f"{archive.root}/api/labels/consensus").json()}
    assert every[role["cr1"]]["majority"] == ["Moderate", "Typical Appearance"]
    assert requests.get(f"{archive.root}/api/labels/consensus", params={"label_group": "x"},
                        timeout=30).status_code == 400

    # cohorts by label and by consensus
    def cohort(name: str, filters: dict, expect: int = 201) -> dict:
        response = requests.post(f"{archive.root}/api/cohorts", json={
            "name": name, "filters": filters}, timeout=60)
        answers.append(response.content)
        assert response.status_code == expect, response.text
        return response.json()

    assert cohort("typical", {"consensus": "Typical Appearance"})["counts"] == {
        "studies": 1, "series": 1, "instances": 1}
    assert cohort("labelled", {"label": "Typical Appearance"})["counts"]["studies"] == 2
    assert cohort("outlined", {"label": "Infectious opacity", "Modality": "CT"})["counts"] == {
        "studies": 1, "series": 1, "instances": 4}
    assert cohort("both", {"label": "Infectious opacity", "consensus": "Negative for "
                           "Pneumonia"}, 400)["error"].startswith("no series match")
    assert cohort("unknown", {"label": "Nothing like it"}, 400)["error"] == (
        "label: no label of that name")

    events = _run(archive, "audit", "--json", "--action", "Import")
    answers.append(events.stdout.encode())
    imports = [json.loads(line)["detail"] for line in events.stdout.splitlines()]
    assert imports[0] == {  # the CLI's import: counts only
        "labels": {"imported": 8, "updated": 0, "unchanged": 0},
        "annotations": {"imported": 17, "updated": 0, "unchanged": 0}, "notInArchive": 2,
        "refusedByReason": {"unknown-label": 1}, "keepNotes": False}
    assert len(imports) == 6 and imports[4]["keepNotes"] is True

    needles = {v.encode() for v in (*READERS, *READERS.values(), DROPPED_NOTE, READER_NAME)}
    assert {n for n in needles if n in path.read_bytes()} == needles  # the scan can find them
    assert _scan(archive, answers, needles) == {}


ANNOTATOR = "tok-annotator-77ab1c"
ROLE_CONFIG = AUTH_CONFIG + f"""
[[auth.tokens]]
name = "annotate"
sha256 = "{sha(ANNOTATOR)}"
role = "annotator"
"""


def test_roles(make_archive, corpus):
    archive = make_archive("labels-auth", ROLE_CONFIG)
    tokens = {**TOKENS, "annotate": ANNOTATOR}
    empty = json.dumps({"labelGroups": GROUPS[:1], "datasets": []}).encode()

    def call(method: str, token: str | None, path: str, data: bytes | None = None
             ) -> requests.Response:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {tokens[token]}"
        return requests.request(method, f"{archive.root}{path}", data=data, headers=headers,
                                timeout=60)

    assert call("POST", None, "/api/annotations", empty).status_code == 401
    for token in ("research", "upload-a"):
        assert call("POST", token, "/api/annotations", empty).status_code == 403
    assert call("GET", "upload-a", "/api/annotations").status_code == 403
    assert call("GET", "upload-a", "/api/labels/consensus").status_code == 403
    done = call("POST", "annotate", "/api/annotations", empty)
    assert (done.status_code, done.json()["labels"]["imported"]) == (200, 3)
    assert call("POST", "admin", "/api/annotations", empty).json()["labels"]["unchanged"] == 3
    for token in ("research", "annotate", "admin"):
        for path in ("/api/annotations", "/api/annotations/export", "/api/labels",
                     "/api/labels/consensus"):
            assert call("GET", token, path).status_code == 200, (token, path)
    # an annotator sees the images, stores none, and reaches no other /api route
    assert call("GET", "annotate", "/dicom-web/studies").status_code in (200, 204)
    stow = call("POST", "annotate", "/dicom-web/studies", b"")
    assert stow.status_code == 403
    assert call("GET", "annotate", "/api/cohorts").status_code == 403
    assert call("GET", "annotate", "/api/clinical").status_code == 403


def test_unknown_schema_and_bad_files_are_refused(make_archive, tmp_path):
    archive = make_archive("labels-cli", CONFIG)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    refused = _run(archive, "labels", "import", str(bad))
    assert refused.returncode == 2 and "not an MD.ai export" in refused.stderr
    missing = _run(archive, "labels", "import", str(tmp_path / "absent.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert _run(archive, "labels", "init-schema", "other").returncode == 2
    broken = requests.post(f"{archive.root}/api/annotations", data=b"{not json", timeout=30,
                           headers={"Content-Type": "application/json"})
    assert (broken.status_code, broken.json()) == (
        400, {"error": "the MD.ai export is not JSON"})
    wrong = requests.post(f"{archive.root}/api/annotations", data=b"{}", timeout=30,
                          headers={"Content-Type": "text/csv"})
    assert wrong.status_code == 415


def test_import_with_dicom_publishes_each_readers_seg_and_sr(make_archive, tmp_path):
    """`labels import --dicom`: the imported outlines as the reader's SEG (segments on the
    outlined frames), the global labels as each reader's SR, found by QIDO-RS; publishing
    again (`labels to-dicom`) leaves them as they are."""
    archive = make_archive("labels-dicom", CONFIG)
    archive.client().store_instances(ct_series("PID-SEG-4242", "SEG^PATIENT", "20200407",
                                               label_dicom.SLICES, label_dicom.SIZE, seed=5))
    [(study, items)] = _instances(archive).items()
    found = [pydicom.Dataset.from_json(i) for i in archive.client().search_for_instances(
        study, fields=["InstanceNumber"])]
    slices = {int(i.InstanceNumber): str(i.SOPInstanceUID) for i in found}
    series = items[0][0]
    outlines = {2: label_dicom.square(10, 10, 20), 4: label_dicom.square(30, 30, 12)}
    annotations = [
        {"id": f"A_ct{n}", "labelId": "L_opa001", "StudyInstanceUID": study,
         "SeriesInstanceUID": series, "SOPInstanceUID": slices[n], "data": data,
         **_reader_entry(U1)} for n, data in outlines.items()]
    annotations += [{"id": f"A_gl{n}", "labelId": label, "StudyInstanceUID": study,
                     **_reader_entry(user)}
                    for n, (label, user) in enumerate((("L_typ001", U1), ("L_ind001", U2)))]
    path = tmp_path / "ct.json"
    path.write_text(json.dumps({"labelGroups": GROUPS, "datasets": [
        {"id": "D_ct", "annotations": annotations}]}))

    imported = _run(archive, "labels", "import", "--dicom", str(path))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[-2:] == ["SEG: 1 new, 0 replaced, 0 unchanged",
                                                 "SR: 2 new, 0 replaced, 0 unchanged"]
    again = _run(archive, "labels", "to-dicom", "--study", study)
    assert again.stdout.splitlines() == ["SEG: 0 new, 0 replaced, 1 unchanged",
                                         "SR: 0 new, 0 replaced, 2 unchanged"], again.stderr

    codes_by_label = {a["labelId"]: a["reader"] for a in requests.get(
        f"{archive.root}/api/annotations", timeout=30).json()}
    ct = {"study": study, "slices": slices}
    seg, pixels = label_dicom.segments(archive, ct, codes_by_label["L_opa001"])
    assert list(pixels) == ["Infectious opacity"]
    assert label_dicom.painted(pixels["Infectious opacity"]) == sorted(outlines)
    for n, (x, y, side) in ((2, (10, 10, 20)), (4, (30, 30, 12))):
        label_dicom.check_square(pixels["Infectious opacity"][n], x, y, side)
    srs = label_dicom.series_of(archive, "SR", study)
    observed = {}
    for found_series in srs:
        sr = label_dicom.retrieve_one(archive, study, str(found_series.SeriesInstanceUID))
        observer, evaluations = label_dicom.evaluations(sr)
        observed[observer.rstrip("^")] = evaluations
    assert observed == {codes_by_label["L_typ001"]: [("99RICORD", "RIC001")],
                        codes_by_label["L_ind001"]: [("99RICORD", "RIC002")]}
    text = str(seg).encode()
    assert not any(v.encode() in text for v in (*READERS, *READERS.values(), READER_NAME))
