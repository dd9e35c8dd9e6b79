"""`ricord-archive import-pacs` against DCMTK's dcmqrscp as the hospital PACS: by accession
(exact matches only), by patient and date range, with C-MOVE (into the command's own listener
or a running archive) and with C-GET; everything de-identified, under the importing site,
exactly once."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from ricord_archive.dimse.client import PacsAddress, PacsError, Transfer
from ricord_archive.index.import_rows import StudyCounts
from ricord_archive.tools import ToolError
from ricord_archive.tools.import_pacs import Wanted, read_accessions, wanted_list, worth_retrying
from tests import dcmtk, load
from tests.conftest import free_port
from tests.pacs import PACS_AET, Pacs
from tests.phi_corpus import PhiCorpus

pytestmark = pytest.mark.slow  # a PACS and an archive per test

HOSPITAL_SITEID = "424242"
# The PACS's AE title belongs to another site: an import still files under the importing one.
PACS_IN_OTHER_SITE = f"""
[[sites]]
name = "hospital"
aets = ["HOSP_MODALITY"]
siteid = "{HOSPITAL_SITEID}"

[[sites]]
name = "other"
aets = ["{PACS_AET}"]
siteid = "515151"
default = true
"""
# The PACS's AE title belongs to no site: only an import session lets it in.
PACS_IN_NO_SITE = f"""
[[sites]]
name = "hospital"
aets = ["HOSP_MODALITY"]
siteid = "{HOSPITAL_SITEID}"
"""


@dataclass
class Hospital:
    files: dict[str, list[Path]]  # by accession number
    planted: set[str]
    patient_ids: list[str]

    def all_files(self) -> list[Path]:
        return [f for files in self.files.values() for f in files]


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Hospital:
    """Two patients, four studies; one object of ACCN1 has burned-in annotation (refused)."""
    corpus = PhiCorpus(seed=20260808, out_dir=tmp_path_factory.mktemp("hospital"))
    first, second = corpus.patient(), corpus.patient()
    studies = {
        "ACCN1": corpus.study(first, dt.date(2020, 1, 2), slices=3),
        "ACCN12": corpus.study(first, dt.date(2020, 6, 2), slices=2),
        "ACCN2": corpus.study(second, dt.date(2021, 3, 4), slices=2),
        "ACCN3": corpus.study(second, dt.date(2015, 3, 4), slices=1),
    }
    for accession, files in studies.items():
        for path in files:
            ds = pydicom.dcmread(path)
            ds.AccessionNumber = accession
            if path == studies["ACCN1"][-1]:
                ds.BurnedInAnnotation = "YES"
            ds.save_as(path)
    planted = corpus.corpus.planted | set(studies)
    return Hospital(studies, planted, [first.patient_id, second.patient_id])


@pytest.fixture
def make_pacs(tmp_path_factory, hospital) -> Iterator:
    started: list[Pacs] = []

    def make(destinations: dict[str, int]) -> Pacs:
        pacs = Pacs(tmp_path_factory.mktemp("pacs"), destinations).start()
        started.append(pacs)
        pacs.load(hospital.all_files())
        return pacs

    yield make
    for pacs in started:
        pacs.stop()


def cli(data_dir: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RICORD_")}
    return subprocess.run(
        [sys.executable, "-m", "ricord_archive", *args, "--data-dir", str(data_dir),
         "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=300,
    )


def table(stdout: str) -> dict[str, dict[str, str]]:
    """The tab-separated lines of import-pacs by their query."""
    return {row["query"]: row for row in csv.DictReader(io.StringIO(stdout), delimiter="\t")}


def counts(row: dict[str, str]) -> tuple[str, ...]:
    keys = ("outcome", "studies", "moved", "stored", "already_stored", "refused", "failed")
    return tuple(row[k] for k in keys)


def blobs(data_dir: Path) -> dict[str, bytes]:
    return load.stored_blobs(data_dir)


def assert_filed_and_deidentified(data_dir: Path, hospital: Hospital, expected: int) -> None:
    """`expected` objects, all under the hospital's SITEID, none holding a planted value."""
    files = blobs(data_dir)
    assert len(files) == expected
    needles = {v.encode() for v in hospital.planted}
    needles |= {p.encode() for v in hospital.planted for p in v.split("^") if len(p) >= 4}
    for key, data in files.items():
        assert not [n for n in needles if n in data], key
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.ClinicalTrialSiteID == HOSPITAL_SITEID
        assert ds.PatientID.startswith(f"{HOSPITAL_SITEID}-")
        assert ds.PatientIdentityRemoved == "YES"


def test_move_by_accession_files_under_the_importing_site_exactly_once(
    tmp_path, hospital, make_pacs
):
    config = tmp_path / "config.toml"
    config.write_text(PACS_IN_OTHER_SITE)
    data_dir = tmp_path / "data"
    listen = free_port()
    pacs = make_pacs({"RICORD": listen})
    accessions = tmp_path / "accessions.txt"
    accessions.write_text("# from the registry\nACCN1\n\nMISSING\nACCN1*\n")
    report = tmp_path / "report.jsonl"
    move = ("import-pacs", "--site", "hospital", "--pacs", pacs.address,
            "--listen-port", str(listen))

    first = cli(data_dir, config, *move, "--accessions", str(accessions), "--report", str(report))
    assert first.returncode == 0, first.stderr
    rows = table(first.stdout)
    # the burned-in object is refused by the archive: the PACS counts it failed, not moved
    assert counts(rows["ACCN1"]) == ("imported", "1", "2", "2", "0", "1", "0")
    assert rows["MISSING"]["outcome"] == "not found"
    # The PACS matches "ACCN1*" as a wildcard (ACCN1 and ACCN12); only an exact match counts.
    wildcard = next(json.loads(line) for line in report.read_text().splitlines()
                    if json.loads(line)["query"] == "ACCN1*")
    assert (wildcard["outcome"], wildcard["candidates"], wildcard["studies"]) == (
        "not found", 2, 0)
    assert "receiving the studies as RICORD" in first.stderr
    assert_filed_and_deidentified(data_dir, hospital, 2)  # ACCN12 was not asked for

    again = tmp_path / "accessions.csv"
    again.write_text("AccessionNumber,Comment\nACCN1,again\nACCN12,new\n")
    second = cli(data_dir, config, *move, "--accessions", str(again))
    assert second.returncode == 0, second.stderr
    rows = table(second.stdout)
    assert counts(rows["ACCN1"]) == ("imported", "1", "2", "0", "2", "1", "0")
    assert counts(rows["ACCN12"]) == ("imported", "1", "2", "2", "0", "0", "0")
    assert_filed_and_deidentified(data_dir, hospital, 4)


def test_move_into_a_running_archive_admits_the_pacs_for_the_session_only(
    make_archive, hospital, make_pacs
):
    archive = make_archive("running", PACS_IN_NO_SITE)
    assert dcmtk.echoscu(archive.dimse_port, calling=PACS_AET).returncode != 0
    pacs = make_pacs({"RICORD": archive.dimse_port})
    result = cli(archive.data_dir, archive.config, "import-pacs", "--site", "hospital",
                 "--pacs", pacs.address, "--accession", "ACCN2",
                 "--listen-port", str(archive.dimse_port))
    assert result.returncode == 0, result.stderr + archive.log()
    assert "in use: the archive listening there receives the studies" in result.stderr
    assert counts(table(result.stdout)["ACCN2"]) == ("imported", "1", "2", "2", "0", "0", "0")
    [study] = archive.client().search_for_studies(search_filters={"AccessionNumber": "*"})
    assert study["00100020"]["Value"][0].startswith(f"{HOSPITAL_SITEID}-")
    assert_filed_and_deidentified(archive.data_dir, hospital, 2)
    # the session closed with the import: the PACS is a stranger again
    assert dcmtk.echoscu(archive.dimse_port, calling=PACS_AET).returncode != 0


def test_get_by_patient_and_accession_and_a_pacs_that_cannot_reach_back(
    tmp_path, hospital, make_pacs
):
    config = tmp_path / "config.toml"
    config.write_text(PACS_IN_OTHER_SITE)
    data_dir = tmp_path / "data"
    pacs = make_pacs({})  # knows no move destination
    base = ("import-pacs", "--site", "hospital", "--pacs", pacs.address)

    refused = cli(data_dir, config, *base, "--accession", "ACCN2",
                  "--listen-port", str(free_port()))
    assert refused.returncode == 2
    assert "the PACS does not know the move destination RICORD" in refused.stderr

    patient = hospital.patient_ids[1]
    first = cli(data_dir, config, *base, "--method", "get", "--patient-id", patient,
                "--date-range", "20210101-20211231")
    assert first.returncode == 0, first.stderr
    # ACCN2 only: ACCN3 of the same patient is from 2015
    assert counts(table(first.stdout)[f"{patient} 20210101-20211231"]) == (
        "imported", "1", "2", "2", "0", "0", "0")

    second = cli(data_dir, config, *base, "--method", "get", "--accession", "ACCN1",
                 "--accession", "ACCN2")
    assert second.returncode == 0, second.stderr
    rows = table(second.stdout)
    assert counts(rows["ACCN1"]) == ("imported", "1", "2", "2", "0", "1", "0")
    assert counts(rows["ACCN2"]) == ("imported", "1", "2", "0", "2", "0", "0")
    assert_filed_and_deidentified(data_dir, hospital, 4)


def test_accession_files_text_and_csv(tmp_path):
    text = tmp_path / "list.txt"
    text.write_text("# comment\n ACC 1 \n\nACC2\nACC2\n")
    assert read_accessions(text) == ["ACC 1", "ACC2", "ACC2"]
    table_file = tmp_path / "list.csv"
    table_file.write_text("PatientID,AccessionNumber\nP1,A1\nP2,\nP3,A3\n")
    assert read_accessions(table_file) == ["A1", "A3"]
    headed = tmp_path / "export.txt"  # a CSV export under another name
    headed.write_text("Note,AccessionNumber\nx,A9\n")
    assert read_accessions(headed) == ["A9"]
    no_column = tmp_path / "other.csv"
    no_column.write_text("PatientID\nP1\n")
    with pytest.raises(ToolError, match="no AccessionNumber column"):
        read_accessions(no_column)


def test_requests_are_checked_and_matched_exactly():
    wanted = wanted_list(["A1", "A1", "A2"], "P1", "20200101-")
    assert [(w.key, w.value, w.date_range) for w in wanted] == [
        ("AccessionNumber", "A1", ""), ("AccessionNumber", "A2", ""),
        ("PatientID", "P1", "20200101-"),
    ]
    assert wanted[2].find_keys()["StudyDate"] == "20200101-"
    for bad in (["A\\B"], ["A\x01"]):
        with pytest.raises(ToolError, match="backslash or a control character"):
            wanted_list(bad, None, None)
    with pytest.raises(ToolError, match="goes with --patient-id"):
        wanted_list(["A1"], None, "20200101-20200202")
    with pytest.raises(ToolError, match="--date-range must be"):
        wanted_list([], "P1", "2020-01-01")
    with pytest.raises(ToolError, match="nothing to import"):
        wanted_list([], None, None)
    answer = pydicom.Dataset()
    answer.AccessionNumber = "ACC12 "
    assert not Wanted("AccessionNumber", "ACC1").matches(answer)
    assert Wanted("AccessionNumber", "ACC12").matches(answer)


def test_only_transient_failures_are_retried():
    done = Transfer(0x0000, 3, 0, 0)
    assert not worth_retrying(done, StudyCounts(stored=3), None)
    assert not worth_retrying(Transfer(0xA702, 0, 3, 0), StudyCounts(refused=3), None)
    assert worth_retrying(Transfer(0xB000, 2, 1, 0), StudyCounts(stored=2, failed=1), None)
    assert worth_retrying(Transfer(0xA701, 0, 0, 0), StudyCounts(), None)
    assert worth_retrying(None, StudyCounts(), PacsError("no association", transient=True))
    assert not worth_retrying(None, StudyCounts(), PacsError("rejected", transient=False))


def test_pacs_addresses():
    assert PacsAddress.parse("PACS@10.0.0.5:104") == PacsAddress("PACS", "10.0.0.5", 104)
    assert PacsAddress.parse("MY PACS@[::1]:11112") == PacsAddress("MY PACS", "::1", 11112)
    for bad in ("PACS@host", "@host:104", "PACS@host:0", "PACS@host:70000",
                "A_TITLE_LONGER_THAN_16@h:1", " PACS@h:1"):
        with pytest.raises(ValueError):
            PacsAddress.parse(bad)
