"""The offline tools (`deid`, `lookup`, `refusals`) against a real archive and its index."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import asyncpg
import pydicom
import pytest

from ricord_archive.deid import Keyring
from ricord_archive.index.store import DATE_OFFSET_MAX_DAYS
from ricord_archive.tools import ToolError
from ricord_archive.tools.dry_run import plan, provisional_date_offset
from ricord_archive.tools.lookup import Wanted, print_csv, read_patients
from tests import load
from tests.conftest import Archive

pytestmark = pytest.mark.slow  # a server process per test

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def run(archive: Archive, *args: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RICORD_")}
    return subprocess.run([*archive.command(*args), *extra], capture_output=True, text=True,
                          env=env, timeout=180)


def db_url(archive: Archive) -> str | None:
    result = run(archive, "db-url")
    return result.stdout.strip() if result.returncode == 0 else None


def index_counts(archive: Archive) -> dict[str, int]:
    """What any write to the index would change."""
    async def fetch() -> dict[str, int]:
        conn = await asyncpg.connect(db_url(archive))
        try:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM patient) AS patients, "
                "(SELECT sum(next_patient_number) FROM site) AS numbers, "
                "(SELECT count(*) FROM site) AS sites, "
                "(SELECT count(*) FROM instance) AS instances, "
                "(SELECT coalesce(sum(count), 0) FROM refusal) AS refusals"
            )
            return dict(row)
        finally:
            await conn.close()

    return asyncio.run(fetch())


def needles(planted: set[str]) -> set[bytes]:
    """Each planted value, and each component of a person name, as bytes."""
    values = set(planted)
    for value in planted:
        values.update(part for part in value.split("^") if len(part) >= 4)
    return {v.encode() for v in values}


def copy_into(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, folder / f.name)) for f in files]


def secondary_capture(source: Path, target: Path) -> Path:
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.9.7"
    ds.save_as(target)
    return target


def outputs(folder: Path) -> dict[Path, pydicom.Dataset]:
    return {p.relative_to(folder): pydicom.dcmread(p) for p in sorted(folder.rglob("*.dcm"))}


def lookup_lines(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


def test_deid_and_lookup_match_ingest_while_running_and_after_stop(
    make_archive, corpus, tmp_path
):
    archive = make_archive("tools")
    client = archive.client()
    known, new = corpus.patient(), corpus.patient()
    first = corpus.study(known, dt.date(2021, 3, 4), slices=2)
    client.store_instances([pydicom.dcmread(f) for f in first])
    [study] = client.search_for_studies()
    pseudonym = study["00100020"]["Value"][0]
    siteid = pseudonym.split("-")[0]

    source = tmp_path / "in"
    second = copy_into(corpus.study(known, dt.date(2021, 9, 4), slices=2), source / "known")
    fresh = copy_into(corpus.study(new, dt.date(2022, 1, 2), slices=2), source / "new" / "sub")
    secondary_capture(first[0], source / "sc.dcm")
    (source / "notes.txt").write_text("not a DICOM file\n")
    (tmp_path / "ids.csv").write_text(
        f"Name,PatientID\nx,{known.patient_id}\ny,{new.patient_id}\n"
    )
    planted = needles(corpus.corpus.planted)
    before = index_counts(archive)

    def check_lookup() -> None:
        plain = run(archive, "lookup", "--site", "default", known.patient_id, new.patient_id)
        assert lookup_lines(plain) == [
            [known.patient_id, pseudonym], [new.patient_id, "not found"]
        ]
        as_csv = run(archive, "lookup", "--site", "default", "--csv", str(tmp_path / "ids.csv"))
        assert as_csv.returncode == 0, as_csv.stderr
        assert as_csv.stdout.splitlines() == [
            "PatientID,pseudonym", f"{known.patient_id},{pseudonym}", f"{new.patient_id},"
        ]

    def check_deid(target: Path) -> subprocess.CompletedProcess:
        result = run(archive, "deid", str(source), str(target), "--site", "default")
        assert result.returncode == 0, result.stderr
        report = result.stderr
        assert "written: 4" in report
        assert "refused: 1" in report and "secondary-capture: 1" in report
        assert "unreadable: 1" in report
        assert f"{source / 'sc.dcm'}: refused (secondary-capture)" in report
        assert f"{source / 'notes.txt'}: unreadable" in report
        written = sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
        assert written == sorted(p.relative_to(source) for p in second + fresh)
        for path in target.rglob("*"):
            if path.is_file():
                assert not {n for n in planted if n in path.read_bytes()}, path
        assert not {n for n in planted if n in (result.stdout + report).encode()}
        for name, ds in outputs(target).items():
            expected = pseudonym if name.parts[0] == "known" else f"{siteid}-DRYRUN-000001"
            assert ds.PatientID == ds.PatientName == expected
            assert ds.ClinicalTrialSubjectID == expected
            assert ds.StudyDate != "20210904" and ds.StudyDate != "20220102"
        return result

    check_lookup()
    check_deid(tmp_path / "out-running")
    assert index_counts(archive) == before  # nothing allocated, counted or stored
    assert run(archive, "refusals").stdout == ""  # the dry run's refusal is not counted

    assert archive.stop() == 0
    assert db_url(archive) is None
    check_lookup()
    assert db_url(archive) is None  # the tool stopped the PostgreSQL it started
    check_deid(tmp_path / "out-stopped")
    assert db_url(archive) is None
    running = outputs(tmp_path / "out-running")
    for name in running:  # provisional pseudonyms and offsets are stable across runs
        assert (tmp_path / "out-running" / name).read_bytes() == (
            tmp_path / "out-stopped" / name).read_bytes()

    # a site the configuration names but the index does not know yet
    config = tmp_path / "later.toml"
    config.write_text('[[sites]]\nname = "default"\ndefault = true\n\n[[sites]]\nname = "later"\n')
    late = run(archive, "lookup", "--site", "later", "X", extra=("--config", str(config)))
    assert late.returncode == 2
    assert "no SITEID in the index" in late.stderr
    assert db_url(archive) is None

    # ingest now does what the dry run showed
    archive.start()
    stored = client.store_instances([pydicom.dcmread(f) for f in second + fresh])
    assert "FailedSOPSequence" not in stored
    assert {str(r.ReferencedSOPInstanceUID) for r in stored.ReferencedSOPSequence} == {
        str(ds.SOPInstanceUID) for ds in running.values()
    }
    blobs = {hashlib.sha256(data).digest()
             for data in load.stored_blobs(archive.data_dir).values()}
    for name in running:  # a known patient's dry run is byte for byte what the archive stores
        if name.parts[0] == "known":
            digest = hashlib.sha256((tmp_path / "out-running" / name).read_bytes()).digest()
            assert digest in blobs
    studies = {s["0020000D"]["Value"][0]: s["00100020"]["Value"][0]
               for s in client.search_for_studies()}
    assert {str(ds.StudyInstanceUID) for ds in running.values()} <= set(studies)
    new_pseudonym = f"{siteid}-000002"
    assert sorted(studies.values()) == sorted([pseudonym, pseudonym, new_pseudonym])
    plain = run(archive, "lookup", "--site", "default", new.patient_id)
    assert lookup_lines(plain) == [[new.patient_id, new_pseudonym]]

    # refusals: counted when ingest refuses, per site and reason
    response = client.store_instances(
        [pydicom.dcmread(source / "sc.dcm"), pydicom.dcmread(first[0])]
    )
    assert [item.FailureReason for item in response.FailedSOPSequence] == [0x0122]
    refusals = run(archive, "refusals")
    assert refusals.returncode == 0, refusals.stderr
    assert refusals.stdout.splitlines() == ["default\tsecondary-capture\t1"]
    assert db_url(archive) is not None  # the archive's PostgreSQL was adopted, not stopped


def test_tools_refuse_a_missing_index_an_unknown_site_and_bad_arguments(tmp_path):
    archive = Archive(tmp_path / "nothing-here", tmp_path / "log")
    missing = run(archive, "lookup", "--site", "default", "X")
    assert missing.returncode == 2
    assert "no archive index" in missing.stderr
    assert not archive.data_dir.exists()  # no empty cluster made on a mistyped --data-dir
    unknown = run(archive, "deid", str(tmp_path), str(tmp_path / "out"), "--site", "nosuch")
    assert unknown.returncode == 2
    assert "no site named 'nosuch'" in unknown.stderr
    for args in (("lookup", "--site", "default"),
                 ("lookup", "--site", "default", "--csv", "a.csv", "X")):
        assert run(archive, *args).returncode == 2
    (tmp_path / "no-column.csv").write_text("ID\nX\n")
    no_column = run(archive, "lookup", "--site", "default", "--csv",
                    str(tmp_path / "no-column.csv"))
    assert no_column.returncode == 2
    assert "no PatientID column" in no_column.stderr


def test_plan_mirrors_folders_and_never_writes_into_its_input(tmp_path):
    source = tmp_path / "in"
    (source / "a" / "b").mkdir(parents=True)
    (source / "x.dcm").write_bytes(b"")
    (source / "a" / "b" / "y").write_bytes(b"")
    out = tmp_path / "out"
    assert plan(source, out) == [
        (source / "a" / "b" / "y", out / "a" / "b" / "y"), (source / "x.dcm", out / "x.dcm")
    ]
    assert plan(source / "x.dcm", out / "z.dcm") == [(source / "x.dcm", out / "z.dcm")]
    out.mkdir()
    assert plan(source / "x.dcm", out) == [(source / "x.dcm", out / "x.dcm")]
    for target in (source, source / "a" / "out"):
        with pytest.raises(ToolError):
            plan(source, target)
    with pytest.raises(ToolError):
        plan(source / "x.dcm", source / "x.dcm")
    with pytest.raises(ToolError):
        plan(tmp_path / "missing", out)


def test_provisional_date_offsets_are_stable_keyed_and_in_range():
    keys, other = Keyring(b"k" * 32), Keyring(b"o" * 32)
    offsets = [provisional_date_offset(keys, "123456", f"P{n}") for n in range(2000)]
    assert all(-DATE_OFFSET_MAX_DAYS <= o < 0 for o in offsets)
    assert len(set(offsets)) > 1000
    assert offsets[:50] == [provisional_date_offset(keys, "123456", f"P{n}") for n in range(50)]
    assert offsets[:50] != [provisional_date_offset(other, "123456", f"P{n}") for n in range(50)]


def test_lookup_csv_reads_the_patient_id_column_and_writes_csv(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text('\ufeffSite,PatientID\nA,"ID, with comma"\nB,\n', encoding="utf-8")
    wanted = read_patients(path)
    assert wanted == Wanted([("ID, with comma", ""), ("", "")], issuer_column=False)
    out = io.StringIO()
    print_csv(wanted, ["123456-000001", None], out)
    assert out.getvalue() == 'PatientID,pseudonym\n"ID, with comma",123456-000001\n,\n'
    with pytest.raises(ToolError):
        read_patients(tmp_path / "missing.csv")


def test_lookup_csv_reads_and_writes_an_issuer_column(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("PatientID,IssuerOfPatientID\nMRN-1,HOSP-A\nMRN-1,\n", encoding="utf-8")
    wanted = read_patients(path)
    assert wanted == Wanted([("MRN-1", "HOSP-A"), ("MRN-1", "")], issuer_column=True)
    out = io.StringIO()
    print_csv(wanted, ["123456-000001", "123456-000002"], out)
    assert out.getvalue() == ("PatientID,IssuerOfPatientID,pseudonym\n"
                              "MRN-1,HOSP-A,123456-000001\nMRN-1,,123456-000002\n")
