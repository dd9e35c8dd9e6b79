"""Clinical data (issue #14): sheets in (CSV by the CLI, .xlsx over HTTP), rows out, keyed like
the images sent over DIMSE before and after the sheet; refusals by row and column without
values; a PHI scan of the index, the files, the log and every answer; role and site scoping."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import subprocess
from pathlib import Path

import asyncpg
import openpyxl
import pydicom
import pytest
import requests

from ricord_archive.clinical import columns as col
from ricord_archive.clinical import sheet
from ricord_archive.clinical.export import ClinicalFilter
from ricord_archive.index.facade import Index
from ricord_archive.services.clinical import split_filters
from tests import dcmtk, leaks
from tests.conftest import Archive
from tests.web.test_auth import CONFIG as AUTH_CONFIG
from tests.web.test_auth import SITEIDS, TOKENS

pytestmark = pytest.mark.slow  # a server process per test

XLSX = sheet.XLSX
COLUMN_MAP = """
[columns.Temperature]
type = "number"
unit = "Cel"
[columns.Severity]
type = "category"
values = ["mild", "moderate", "severe"]
[columns.ICU]
type = "boolean"
[columns.AdmissionDate]
type = "date"
"""
# the sites of test_auth; storescu sends as the intake site (the default)
SITES = "".join(
    f'[[sites]]\nname = "{name}"\nsiteid = "{SITEIDS[name]}"\n'
    + ('default = true\naets = ["STORESCU"]\n' if name == "intake" else "") + "\n"
    for name in ("intake", "site-a", "site-b")
)
HEADER = ["MRN", "IssuerOfPatientID", "AccessionNumber", "StudyInstanceUID", "StudyDate",
          "Age", "Sex", "TestMethod", "TestResult", "TestDate", "Temperature", "Severity", "ICU",
          "AdmissionDate"]


# --- the pure part ----------------------------------------------------------------------------

def _parse(rows: list[list[object]], declared: str = COLUMN_MAP) -> sheet.ParsedSheet:
    return sheet.parse_sheet(sheet.Table(HEADER, list(enumerate(rows, start=2))),
                             col.parse_column_map(declared))


def test_cells_are_typed_and_refused_by_row_and_column_without_their_value():
    good = ["P1", "", "A1", "1.2.3", "2021-03-04", "95", "f", "pcr", "NOT DETECTED",
            "20210305", "38.5", "Severe", "yes", dt.date(2021, 3, 1)]
    bad_number = [*good[:2], "A2", "", "", "", "", "", "", "", "TEXTLEAK-1", "", "", ""]
    bad_category = [*good[:2], "A3", "", "", "", "", "", "", "", "", "TEXTLEAK-2", "", ""]
    bad_uid = ["P1", "", "", "TEXTLEAK-3", "", "", "", "", "", "", "", "", "", ""]
    no_patient = ["", "", "A4", *[""] * 11]
    no_exam = ["P9", *[""] * 13]
    twice = [["P5", "", "A5", *[""] * 11], ["P6", "", "A5", *[""] * 11]]
    parsed = _parse([good, bad_number, bad_category, bad_uid, no_patient, no_exam, *twice])
    [row] = parsed.rows
    assert row.values == {"Age": 90, "Sex": "F", "TestMethod": "PCR", "TestResult": "NEGATIVE",
                          "TestDate": dt.date(2021, 3, 5)}
    assert row.extra == {"Temperature": 38.5, "Severity": "severe", "ICU": True,
                         "AdmissionDate": dt.date(2021, 3, 1)}
    assert (row.patient_id, row.issuer, row.accession) == ("P1", None, "A1")
    refused = [(r.line, r.column, r.reason) for r in parsed.refusals]
    assert refused == [
        (3, "Temperature", "invalid-value"), (4, "Severity", "invalid-value"),
        (5, "StudyInstanceUID", "invalid-value"), (6, "PatientID", "missing-patient-id"),
        (7, None, "missing-examination"), (8, "AccessionNumber", "duplicate-examination"),
        (9, "AccessionNumber", "duplicate-examination"),
    ]
    assert "TEXTLEAK" not in json.dumps([r.as_dict() for r in parsed.refusals])


def test_undeclared_and_free_text_columns_are_refused_by_position():
    table = sheet.read_table(b"PatientID,AccessionNumber,Notes\r\nP1,A1,SECRETNOTE\r\n",
                             sheet.CSV)
    with pytest.raises(sheet.SheetError, match=r"column 3 \(C\)") as refused:
        sheet.parse_sheet(table, {})
    assert "Notes" not in str(refused.value) and "SECRET" not in str(refused.value)
    with pytest.raises(sheet.SheetError, match="no AccessionNumber or StudyInstanceUID"):
        sheet.parse_sheet(sheet.read_table(b"PatientID,Age\r\nP1,40\r\n", sheet.CSV), {})
    for bad in ('[columns.Notes]\ntype = "text"\n', '[columns.W]\ntype = "number"\n',
                '[columns.S]\ntype = "category"\n', '[columns.Age]\ntype = "number"\nunit="a"'):
        with pytest.raises(col.ColumnMapError):
            col.parse_column_map(bad)


# --- end to end -------------------------------------------------------------------------------

def _header_dates(files: list[Path]) -> dict[str, str]:
    first = pydicom.dcmread(files[0])
    return {"PatientID": first.PatientID, "AccessionNumber": first.AccessionNumber,
            "StudyInstanceUID": first.StudyInstanceUID, "StudyDate": first.StudyDate}


def _iso(day: str) -> str:
    return f"{day[:4]}-{day[4:6]}-{day[6:]}"


def _sheet_rows(before: dict[str, str], after: dict[str, str], result_a: str) -> list[list]:
    """A (images before the sheet) by study UID, B (images after) by accession only, C (no
    images ever) by accession, and two rows with refused cells."""
    day_a = dt.datetime.strptime(before["StudyDate"], "%Y%m%d").date()
    day_b = dt.datetime.strptime(after["StudyDate"], "%Y%m%d").date()
    return [
        [before["PatientID"], "", before["AccessionNumber"], before["StudyInstanceUID"], day_a,
         95, "F", "PCR", result_a, day_a + dt.timedelta(days=2), 38.5, "severe", True,
         day_a - dt.timedelta(days=1)],
        [after["PatientID"], "HOSPITAL-ISSUER-77", after["AccessionNumber"], "", day_b, 44,
         "M", "SEROLOGY", "POSITIVE", day_b, 36.9, "mild", False, day_b],
        ["PIDSHEETONLY31", "", "ACCSHEETONLY31", "", dt.date(2021, 6, 17), 30, "U", "CLINICAL",
         "INDETERMINATE", dt.date(2021, 6, 16), "", "", "", ""],
        ["PIDREFUSED4242", "", "ACCREFUSED4242", "", dt.date(2021, 7, 1), "AGE-LEAK-7731",
         "F", "PCR", "POSITIVE", "", "", "", "", ""],
        ["PIDREFUSED5353", "", "ACCREFUSED5353", "", "", 50, "F", "PCR", "POSITIVE", "",
         "HOT-LEAK-8842", "", "", ""],
    ]


def _write_csv(path: Path, rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows([[v.isoformat() if isinstance(v, dt.date) else v for v in row]
                          for row in rows])
    return path


def _xlsx(rows: list[list]) -> bytes:
    book = openpyxl.Workbook()
    book.active.title = "Clinical"
    book.active.append(HEADER)
    for row in rows:
        book.active.append([None if v == "" else v for v in row])
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def _needles(rows: list[list], refused: tuple[str, ...]) -> set[bytes]:
    """Every original identifier and date of the sheet, and every refused cell."""
    values: set[str] = set(refused)
    for row in rows:
        values.update(str(v) for v in row[:4] if v)
        for v in (row[4], row[9], row[13]):
            if isinstance(v, dt.date):
                values.update({v.strftime("%Y%m%d"), v.isoformat()})
    return {v.encode() for v in values}


def test_sheets_meet_images_sent_before_and_after(make_archive, corpus, tmp_path):
    archive = make_archive("clinical", SITES)
    answers: list[bytes] = []
    images_a = corpus.study(corpus.patient(), dt.date(2021, 1, 10))
    images_b = corpus.study(corpus.patient(), dt.date(2021, 2, 11), slices=2)
    before, after = _header_dates(images_a), _header_dates(images_b)
    rows = _sheet_rows(before, after, "DETECTED")
    needles = _needles(rows, ("AGE-LEAK-7731", "HOT-LEAK-8842"))

    sent = dcmtk.storescu(archive.dimse_port, images_a)  # images before the sheet
    assert sent.stderr.count("(Success)") == len(images_a), sent.stderr
    (tmp_path / "map.toml").write_text(COLUMN_MAP)
    csv_path = _write_csv(tmp_path / "sheet.csv", rows)
    assert {n for n in needles if n in csv_path.read_bytes()} == needles - {
        d.strftime("%Y%m%d").encode() for r in rows for d in (r[4], r[9], r[13])
        if isinstance(d, dt.date)}  # the scanner finds each value where it is (dates: ISO)
    imported = subprocess.run(archive.command(
        "clinical", "import", str(csv_path), "--site", "intake",
        "--columns", str(tmp_path / "map.toml"),
    ), capture_output=True, text=True, timeout=120)
    answers += [imported.stdout.encode(), imported.stderr.encode()]
    assert imported.returncode == 1, imported.stderr  # some rows refused
    assert imported.stdout.splitlines()[:2] == [
        "imported 3, updated 0, unchanged 0, refused 2 (2 invalid-value)",
        "2 examinations not yet in the archive (linked when their images arrive)",
    ]
    assert "row 5, column Age: invalid-value" in imported.stdout
    assert "row 6, column Temperature: invalid-value" in imported.stdout

    sent = dcmtk.storescu(archive.dimse_port, images_b)  # images after the sheet
    assert sent.stderr.count("(Success)") == len(images_b), sent.stderr

    api = f"{archive.root}/api/clinical"
    workbook = _xlsx(rows)
    wrong = requests.post(api, data=workbook, params={"sheet": "Other"},
                          headers={"Content-Type": XLSX}, timeout=60)
    assert (wrong.status_code, wrong.json()) == (
        400, {"error": "the workbook has no sheet of that name"})
    again = requests.post(api, data=workbook, params={"sheet": "Clinical"},
                          headers={"Content-Type": XLSX}, timeout=60)
    answers.append(again.content)
    assert again.status_code == 200, again.text
    summary = again.json()
    assert {k: summary[k] for k in ("imported", "updated", "unchanged", "notInArchive")} == {
        "imported": 0, "updated": 0, "unchanged": 3, "notInArchive": 1,
    }  # the same sheet as a workbook changes nothing; B's images have arrived
    assert summary["refused"] == {"invalid-value": 2}
    assert [(e["row"], e["column"]) for e in summary["errors"]] == [(5, "Age"),
                                                                    (6, "Temperature")]

    corrected = _sheet_rows(before, after, "NEGATIVE")[:1]  # one row, one column changed
    fixed = requests.post(api, data=_write_csv(tmp_path / "fix.csv", corrected).read_bytes(),
                          headers={"Content-Type": "text/csv"}, timeout=60)
    answers.append(fixed.content)
    assert (fixed.json()["updated"], fixed.json()["unchanged"]) == (1, 0)

    listing = requests.get(api, headers={"Accept": "application/json"}, timeout=60)
    answers.append(listing.content)
    exported = {r["AccessionNumber"]: r for r in listing.json()["rows"]}
    assert len(exported) == 3
    studies = _studies_by_size(archive)  # A has 3 instances, B 2
    for images, size, expected in ((before, 3, {
        "Age": 90, "Sex": "F", "TestMethod": "PCR", "TestResult": "NEGATIVE",
        "Temperature": 38.5, "Severity": "severe", "ICU": True,
    }), (after, 2, {
        "Age": 44, "Sex": "M", "TestMethod": "SEROLOGY", "TestResult": "POSITIVE",
        "Temperature": 36.9, "Severity": "mild", "ICU": False,
    })):
        qido = studies[size]
        row = exported[qido["AccessionNumber"]]  # the keyed accession of the images
        assert {k: row[k] for k in expected} == expected
        assert row["SITEID"] == SITEIDS["intake"]
        assert row["PatientID"] == qido["PatientID"]  # the images' pseudonym
        assert row["StudyInstanceUID"] == qido["StudyInstanceUID"]
        assert row["StudyDate"] == qido["StudyDate"]  # shifted by the patient's offset
        offset = _days(qido["StudyDate"]) - _days(images["StudyDate"])
        assert offset < 0
        assert _days(row["TestDate"]) - offset == _days(images["StudyDate"]) + (
            2 if images is before else 0)
    sheet_only = next(r for r in exported.values() if r["Age"] == 30)
    assert sheet_only["StudyInstanceUID"] is None and "Temperature" not in sheet_only
    assert len({r["PatientID"] for r in exported.values()}) == 3
    # the sheet-only patient is allocated as ingest allocates one: with its allocation record
    assert list(archive.data_dir.rglob(f"patients/{sheet_only['PatientID']}.json"))

    def rows_for(**params: str) -> list[dict]:
        response = requests.get(api, params=params, timeout=60)
        answers.append(response.content)
        assert response.status_code == 200, response.text
        return response.json()["rows"]

    assert [r["Sex"] for r in rows_for(TestResult="DETECTED")] == ["M"]
    assert sorted(r["Age"] for r in rows_for(Age="18-65")) == [30, 44]
    assert [r["Age"] for r in rows_for(Temperature="37-", ICU="true")] == [90]
    assert [r["Age"] for r in rows_for(Severity="mild,moderate")] == [44]
    pseudonym = studies[2]
    assert [r["Age"] for r in rows_for(PatientID=pseudonym["PatientID"])] == [44]
    assert [r["Age"] for r in rows_for(StudyInstanceUID=pseudonym["StudyInstanceUID"])] == [44]
    shifted_b = pseudonym["StudyDate"]
    assert [r["Age"] for r in rows_for(StudyDate=f"{shifted_b}-{shifted_b}")] == [44]
    assert rows_for(site="site-a") == []

    # C, named by its accession number so far, now also by its study UID (and A by its
    # accession only): the same rows are updated, none is added
    late_uid = "1.2.826.0.1.3680043.10.5555.31"
    needles.add(late_uid.encode())
    renamed = [[*rows[2][:3], late_uid, *rows[2][4:]],
               [rows[0][0], "", rows[0][2], "", *rows[0][4:5], 91, *rows[0][6:]]]
    answers.append((late := requests.post(
        api, data=_write_csv(tmp_path / "late.csv", renamed).read_bytes(),
        headers={"Content-Type": "text/csv"}, timeout=60)).content)
    assert {k: late.json()[k] for k in ("imported", "updated", "unchanged")} == {
        "imported": 0, "updated": 2, "unchanged": 0}
    both_ways = [rows[0], [rows[0][0], "", rows[0][2], "", *rows[0][4:]]]  # A twice
    answers.append((twice := requests.post(
        api, data=_write_csv(tmp_path / "twice.csv", both_ways).read_bytes(),
        headers={"Content-Type": "text/csv"}, timeout=60)).content)
    assert twice.json()["refused"] == {"duplicate-examination": 1}
    assert twice.json()["errors"][0]["row"] == 3
    latest = {r["Age"]: r for r in rows_for()}
    assert sorted(latest) == [30, 44, 90]  # A's 91 is 90 too; still three examinations
    assert latest[30]["StudyInstanceUID"] is not None  # C's keyed study UID
    assert latest[30]["StudyInstanceUID"] != late_uid
    bad = requests.get(api, params={"Notes": "x"}, timeout=30)
    assert bad.status_code == 400

    ricord = requests.get(api, params={"columns": "ricord"}, headers={"Accept": "text/csv"},
                          timeout=60)
    answers.append(ricord.content)
    assert ricord.headers["Content-Type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(ricord.text)))
    assert {"Anon MRN", "Anon Age", "Anon Sex", "Anon Study UID", "Anon TCIA Study Date",
            "Result", "SITEID", "AccessionNumber", "Temperature"} <= set(table[0])
    assert sorted(r["Anon MRN"] for r in table) == sorted(r["PatientID"]
                                                          for r in exported.values())

    events = subprocess.run(archive.command("audit", "--json", "--action", "Import"),
                            capture_output=True, text=True, timeout=120)
    imports = [json.loads(line)["detail"] for line in events.stdout.splitlines()]
    assert [(e.get("imported"), e.get("updated"), e.get("reason")) for e in imports] == [
        (3, 0, None), (None, None, "BadRequest"), (0, 0, None), (0, 1, None), (0, 2, None),
        (0, 0, None)]  # the refused workbook is recorded too, without counts
    exports = subprocess.run(archive.command("audit", "--json", "--action", "Export"),
                             capture_output=True, text=True, timeout=120)
    assert len(exports.stdout.splitlines()) >= 8

    # authentication off: ?site= names the site of an import and of an export
    other = requests.post(api, params={"site": "site-a"}, timeout=60,
                          data=b"PatientID,AccessionNumber,Age\r\nPIDOTHER66,ACCOTHER66,50\r\n",
                          headers={"Content-Type": "text/csv"})
    answers.append(other.content)
    assert (other.json()["site"], other.json()["imported"]) == ("site-a", 1)
    needles.update({b"PIDOTHER66", b"ACCOTHER66"})
    assert [(r["SITEID"], r["Age"]) for r in rows_for(site="site-a")] == [
        (SITEIDS["site-a"], 50)]
    assert requests.get(api, params={"site": "nowhere"}, timeout=30).status_code == 400
    assert _cohort_view(archive, {"Age": "18-65", "Modality": "CT"}) == (
        {studies[2]["StudyInstanceUID"]}, [44], {"Modality": "CT"})  # C is not in the archive
    # a shifted date that happens to equal an original date of the sheet is no leak
    shifted = {r[k] for r in rows_for() for k in ("StudyDate", "TestDate", "AdmissionDate")
               if r.get(k)}
    needles -= {form.encode() for day in shifted for form in (day, _iso(day))}
    assert len(needles) >= 20
    index = leaks.index_text(archive)
    assert b"Temperature" in index  # the dump holds the clinical rows
    assert leaks.leaks(archive, index, answers, needles) == {}


def test_roles_and_sites_with_authentication_on(make_archive):
    archive = make_archive("clinical-auth", AUTH_CONFIG)
    api = f"{archive.root}/api/clinical"
    body = b"PatientID,AccessionNumber,Age,TestResult\r\nPIDSHARED77,ACCSHARED77,40,POSITIVE\r\n"

    def call(method: str, token: str | None, url: str = api, data: bytes | None = None,
             media: str = "text/csv", **params: str) -> requests.Response:
        headers = {"Content-Type": media, "Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {TOKENS[token]}"
        return requests.request(method, url, data=data, params=params, headers=headers,
                                timeout=60)

    assert call("POST", None, data=body).status_code == 401
    assert call("GET", None).status_code == 401
    assert call("POST", "research", data=body).status_code == 403
    assert call("POST", "upload-a", data=body, site="site-b").status_code == 403
    assert call("POST", "admin", data=body, site="nowhere").status_code == 400
    own = call("POST", "upload-a", data=body)
    assert (own.status_code, own.json()["site"], own.json()["imported"]) == (200, "site-a", 1)
    named = call("POST", "admin", data=body, site="site-b")
    assert (named.status_code, named.json()["site"], named.json()["imported"]) == (
        200, "site-b", 1)
    declared = call("POST", "upload-b", f"{api}/columns", COLUMN_MAP.encode(), "text/plain")
    assert (declared.status_code, declared.json()["declared"]) == (
        200, ["AdmissionDate", "ICU", "Severity", "Temperature"])
    assert call("POST", "research", f"{api}/columns", COLUMN_MAP.encode()).status_code == 403

    def sites(token: str, **params: str) -> list[str]:
        response = call("GET", token, **params)
        assert response.status_code == 200, response.text
        return sorted(r["SITEID"] for r in response.json()["rows"])

    both = sorted([SITEIDS["site-a"], SITEIDS["site-b"]])
    assert sites("research") == sites("admin") == both
    assert sites("research", site="site-a") == [SITEIDS["site-a"]]
    assert sites("upload-b") == sites("upload-b", site="site-b") == [SITEIDS["site-b"]]
    assert call("GET", "upload-b", site="site-a").status_code == 403
    rows = call("GET", "research").json()["rows"]
    assert rows[0]["PatientID"] != rows[1]["PatientID"]  # one ID, two sites, two patients
    assert rows[0]["AccessionNumber"] != rows[1]["AccessionNumber"]


def _cohort_view(
    archive: Archive, filters: dict[str, str],
) -> tuple[set[str], list[int], dict[str, str]]:
    """What the cohorts see through the interface they use: the studies in the archive whose
    clinical rows match, those rows' ages, and the filters left for QIDO-RS."""

    async def view() -> tuple[set[str], list[int], dict[str, str]]:
        pool = await asyncpg.create_pool(leaks.db_url(archive), min_size=1, max_size=2)
        try:
            index = Index(pool)
            wanted, rest = await split_filters(index, None, filters)
            assert wanted is not None
            uids = await index.clinical.matching_study_uids(wanted)
            rows = await index.clinical.clinical_rows(ClinicalFilter(), uids)
            return uids, [r["Age"] for r in rows], rest
        finally:
            await pool.close()

    return asyncio.run(view())


def _studies_by_size(archive: Archive) -> dict[int, dict[str, str]]:
    """The archive's studies (QIDO-RS) by their number of instances."""
    studies = requests.get(f"{archive.dicomweb_url}/studies", timeout=30).json()
    return {int(s["00201208"]["Value"][0]): {k: s[t]["Value"][0] for k, t in (
        ("PatientID", "00100020"), ("StudyInstanceUID", "0020000D"), ("StudyDate", "00080020"),
        ("AccessionNumber", "00080050"),
    )} for s in studies}


def _days(day: str) -> int:
    return dt.datetime.strptime(day, "%Y%m%d").date().toordinal()


def test_rows_meet_the_patient_of_their_issuer(make_archive, corpus):
    """One record number under two issuers is two patients (#16): each sheet row meets the
    images of its own issuer's patient, whichever arrives first."""
    archive = make_archive("clinical-issuers", SITES)
    first = corpus.patient("MRN-SHARED-8181", issuer="ISSUER-NORTH")
    second = corpus.patient("MRN-SHARED-8181", issuer="ISSUER-SOUTH")
    images_first = corpus.study(first, dt.date(2021, 3, 1), slices=3)
    images_second = corpus.study(second, dt.date(2021, 3, 2), slices=2)
    sent = dcmtk.storescu(archive.dimse_port, images_first)  # before the sheet
    assert sent.stderr.count("(Success)") == 3, sent.stderr
    rows = []
    for patient, images, age in ((first, images_first, 41), (second, images_second, 62)):
        header = _header_dates(images)
        rows.append([patient.patient_id, patient.issuer, "", header["StudyInstanceUID"],
                     _iso(header["StudyDate"]), age, "F", "PCR", "POSITIVE"])
    body = io.StringIO()
    csv.writer(body).writerows([HEADER[:9], *rows])
    imported = requests.post(f"{archive.root}/api/clinical", data=body.getvalue().encode(),
                             headers={"Content-Type": "text/csv"}, timeout=60)
    assert imported.status_code == 200, imported.text
    assert imported.json()["imported"] == 2
    sent = dcmtk.storescu(archive.dimse_port, images_second)  # after the sheet
    assert sent.stderr.count("(Success)") == 2, sent.stderr

    studies = _studies_by_size(archive)
    exported = {r["Age"]: r for r in requests.get(
        f"{archive.root}/api/clinical", headers={"Accept": "application/json"},
        timeout=60).json()["rows"]}
    for age, size in ((41, 3), (62, 2)):
        assert exported[age]["PatientID"] == studies[size]["PatientID"]
        assert exported[age]["StudyInstanceUID"] == studies[size]["StudyInstanceUID"]
    assert studies[3]["PatientID"] != studies[2]["PatientID"]
