"""Patient identity by issuer (issue #16): a PatientID is unique only within its
IssuerOfPatientID, so the patient key is (site, issuer, PatientID); a site's default_issuer fills
a missing issuer; a patient allocated before issuers counted (known by the hash of (site,
PatientID) alone) is claimed by the first issuer that arrives, once, even with senders at once;
lookup, the deid dry run and rebuild-index follow the same rule."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pydicom
import pytest

from ricord_archive.blobstore import FileBlobStore
from ricord_archive.blobstore.records import PatientRecord
from ricord_archive.config import ConfigError, SiteConfig, load_config
from ricord_archive.deid import Keyring, PatientKeys
from ricord_archive.index.database import create_pool
from ricord_archive.index.facade import Index
from ricord_archive.index.migrate import load_migrations, migrate
from ricord_archive.index.store import Site, ensure_site, patient_for
from ricord_archive.services.patients import PatientDirectory, find_patients
from tests import dcmtk
from tests.conftest import Archive, fresh_database
from tests.phi_corpus import PhiCorpus
from tests.tools.test_tools import run

pytestmark = pytest.mark.slow  # a server process per test

SECRET = b"s" * 32
SITEID = "123456"


# ---- the keys ----------------------------------------------------------------------------------

def test_an_issuerless_key_is_todays_key_bit_for_bit():
    keys = Keyring(SECRET)
    today = hmac.new(SECRET, b"patient\x00123456\x00MRN-1", hashlib.sha256).digest()
    assert keys.patient_key(SITEID, "MRN-1") == today
    assert keys.patient_keys(SITEID, "MRN-1") == PatientKeys(today, None)


def test_the_issuer_is_part_of_the_key():
    keys = Keyring(SECRET)
    a, b = keys.patient_key(SITEID, "MRN-1", "HOSP-A"), keys.patient_key(SITEID, "MRN-1", "HOSP-B")
    assert len({a, b, keys.patient_key(SITEID, "MRN-1")}) == 3
    assert a == keys.patient_key(SITEID, "MRN-1", "HOSP-A")
    assert a != keys.patient_key("654321", "MRN-1", "HOSP-A")
    assert a != keys.patient_key(SITEID, "MRN-2", "HOSP-A")
    assert keys.patient_keys(SITEID, "MRN-1", "HOSP-A") == PatientKeys(
        a, keys.patient_key(SITEID, "MRN-1"))


def test_default_issuer_is_configured_per_site(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[sites]]\nname = "a"\ndefault_issuer = " HOSP-A "\n'
                    '[[sites]]\nname = "b"\n')
    config = load_config(path, env={})
    assert config.site_named("a").default_issuer == "HOSP-A"
    assert config.site_named("a").issuer_of("") == "HOSP-A"
    assert config.site_named("a").issuer_of("HOSP-B") == "HOSP-B"
    assert config.site_named("b").issuer_of("") == ""
    for bad in ('"A\\\\B"', "1", f'"{"x" * 65}"'):
        path.write_text(f'[[sites]]\nname = "a"\ndefault_issuer = {bad}\n')
        with pytest.raises(ConfigError, match="default_issuer"):
            load_config(path, env={})


def test_allocation_records_keep_the_old_form_and_merge():
    legacy = PatientRecord(SITEID, "123456-000001", b"\x01" * 32, -10)
    assert legacy.encode() == (b'{"siteid":"123456","pseudonym":"123456-000001","patient_key":"'
                               + b"01" * 32 + b'","date_offset_days":-10}')
    assert legacy.record_name == "patients/123456-000001.json"
    claimed = PatientRecord(SITEID, "123456-000001", b"\x01" * 32, -10, b"\x02" * 32)
    assert claimed.record_name == "patients/123456-000001.issuer.json"
    second = PatientRecord(SITEID, "123456-000002", None, -20, b"\x03" * 32)
    assert [PatientRecord.decode(r.encode()) for r in (legacy, claimed, second)] == [
        legacy, claimed, second]
    assert PatientRecord.merged([claimed, legacy, second]) == [claimed, second]
    assert PatientRecord.merged([legacy, claimed]) == [claimed]


# ---- the index: legacy claim, concurrency ------------------------------------------------------

def _in_database(cluster: str, request, scenario, migrations=None) -> None:
    async def go() -> None:
        name = request.node.name[-60:]
        pool = await create_pool(await fresh_database(cluster, name))
        try:
            async with pool.acquire() as conn:
                await migrate(conn, migrations)
                site = await ensure_site(conn, SiteConfig("site-a"))
            await scenario(pool, site)
        finally:
            await pool.close()
    asyncio.run(go())


async def _old_code_patient(conn: asyncpg.Connection, site: Site, patient_id: str) -> str:
    """A patient allocated as the archive did before migration 012 (its own statements)."""
    number = await conn.fetchval(
        "UPDATE site SET next_patient_number = next_patient_number + 1 "
        "WHERE id = $1 RETURNING next_patient_number - 1", site.id)
    return await conn.fetchval(
        "INSERT INTO patient (site_id, patient_key, pseudonym, date_offset_days) "
        "VALUES ($1, $2, $3, $4) RETURNING pseudonym",
        site.id, Keyring(SECRET).patient_key(site.siteid, patient_id),
        f"{site.siteid}-{number:06d}", -30)


def test_a_legacy_patient_is_claimed_by_the_first_issuer_only(cluster, request, tmp_path):
    keys = Keyring(SECRET)
    before_012 = [m for m in load_migrations() if m.version < 12]

    async def scenario(pool: asyncpg.Pool, site: Site) -> None:
        async with pool.acquire() as conn:
            legacy = await _old_code_patient(conn, site, "MRN-1")
            await migrate(conn)  # the archive upgraded: 012 and whatever follows
        site_config = SiteConfig("site-a")
        directory = PatientDirectory(Index(pool), keys, FileBlobStore(tmp_path / "blobs"))

        async def find(issuer: str) -> str | None:
            [found] = await find_patients(Index(pool), keys, site, site_config, [("MRN-1", issuer)])
            return found.pseudonym if found else None

        # before any issuer arrived, lookups of any issuer name the claimable patient
        assert await find("HOSP-A") == await find("HOSP-B") == await find("") == legacy
        first = await directory.resolve(site, site_config, "MRN-1", "HOSP-A")
        assert first.pseudonym == legacy and first.date_offset_days == -30
        second = await directory.resolve(site, site_config, "MRN-1", "HOSP-B")
        assert second.pseudonym != legacy
        assert (await directory.resolve(site, site_config, "MRN-1", "HOSP-A")).pseudonym == legacy
        assert (await directory.resolve(site, site_config, "MRN-1")).pseudonym == legacy
        # a fresh node (no cache) reads the same from the index
        fresh = PatientDirectory(Index(pool), keys, FileBlobStore(tmp_path / "blobs"))
        assert (await fresh.resolve(site, site_config, "MRN-1", "HOSP-B")) == second
        assert await find("HOSP-A") == legacy and await find("HOSP-B") == second.pseudonym
        assert await find("HOSP-C") is None  # the legacy patient is taken: HOSP-C is new
        rows = await pool.fetch("SELECT pseudonym, patient_key IS NOT NULL AS plain, "
                                "issuer_key IS NOT NULL AS by_issuer FROM patient ORDER BY pk")
        assert [tuple(r) for r in rows] == [(legacy, True, True), (second.pseudonym, False, True)]
        records = PatientRecord.merged(PatientRecord.decode(data) for _, data in
                                       FileBlobStore(tmp_path / "blobs").records.read("patients"))
        assert {(r.pseudonym, r.patient_key, r.issuer_key) for r in records} == {
            (legacy, keys.patient_key(site.siteid, "MRN-1"),
             keys.patient_key(site.siteid, "MRN-1", "HOSP-A")),
            (second.pseudonym, None, keys.patient_key(site.siteid, "MRN-1", "HOSP-B")),
        }

    _in_database(cluster, request, scenario, before_012)


def test_concurrent_claims_yield_one_claim(cluster, request):
    keys = Keyring(SECRET)

    async def scenario(pool: asyncpg.Pool, site: Site) -> None:
        async with pool.acquire() as conn:
            legacy = await _old_code_patient(conn, site, "MRN-1")
        connections = [await pool.acquire() for _ in range(10)]  # all open before the race
        for conn in connections:
            await pool.release(conn)
        issuers = [f"HOSP-{n}" for n in range(8)]
        claims = await asyncio.gather(*(
            patient_for(pool, site, keys.patient_keys(site.siteid, "MRN-1", issuer))
            for issuer in issuers))
        pseudonyms = [c.patient.pseudonym for c in claims]
        assert pseudonyms.count(legacy) == 1
        assert len(set(pseudonyms)) == len(issuers)
        # one issuer from many senders at once: one patient, allocated once
        same = await asyncio.gather(*(
            patient_for(pool, site, keys.patient_keys(site.siteid, "MRN-2", "HOSP-0"))
            for _ in range(8)))
        assert len({s.patient for s in same}) == 1
        # the legacy patient (claimed once), one new patient per other issuer, and MRN-2's
        assert await pool.fetchval("SELECT count(*) FROM patient") == len(issuers) + 1

    _in_database(cluster, request, scenario)


# ---- end to end: DIMSE, STOW-RS, lookup, deid, rebuild-index -----------------------------------

def _pseudonyms(archive: Archive) -> dict[str, str]:
    """Study UID -> pseudonymous PatientID."""
    return {s["0020000D"]["Value"][0]: s["00100020"]["Value"][0]
            for s in archive.client().search_for_studies()}


def _pseudonym_of_new_study(archive: Archive, send) -> str:
    before = _pseudonyms(archive)
    send()
    after = _pseudonyms(archive)
    [new] = set(after) - set(before)
    return after[new]


def _by_dimse(archive: Archive, files: list[Path], calling: str = "STORESCU") -> None:
    result = dcmtk.storescu(archive.dimse_port, files, calling)
    assert result.stderr.count("(Success)") == len(files), result.stderr


def _by_stow(archive: Archive, files: list[Path]) -> None:
    archive.client().store_instances([pydicom.dcmread(f) for f in files])


def _lookup(archive: Archive, *args: str) -> list[list[str]]:
    result = run(archive, "lookup", "--site", "hospital", *args)
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


def test_two_issuers_two_pseudonyms_default_issuer_lookup_and_rebuild(
    make_archive, corpus: PhiCorpus, tmp_path
):
    issuer_a, issuer_b = corpus.corpus.plant("ISSUERAAAA"), corpus.corpus.plant("ISSUERBBBB")
    archive = make_archive("issuers", config_text=(
        f'[[sites]]\nname = "hospital"\naets = ["STORESCU"]\ndefault_issuer = "{issuer_a}"\n'
    ))
    day = dt.date(2021, 5, 1)
    pseudonyms: dict[str, dict[str, str]] = {}
    for protocol, send, shared_id in (("dimse", _by_dimse, "MRNDIMSE1"),
                                      ("stow", _by_stow, "MRNSTOW01")):
        patients = {"A": corpus.patient(shared_id, issuer_a),
                    "B": corpus.patient(shared_id, issuer_b),
                    "none": corpus.patient(shared_id)}
        pseudonyms[protocol] = {
            label: _pseudonym_of_new_study(
                archive, lambda p=patient, s=send: s(archive, corpus.study(p, day, slices=2)))
            for label, patient in patients.items()
        }
    for protocol, found in pseudonyms.items():
        assert found["A"] != found["B"], protocol  # same ID, two issuers: two patients
        assert found["none"] == found["A"], protocol  # no issuer: the site's default_issuer
    assert pseudonyms["dimse"]["A"] != pseudonyms["stow"]["A"]

    dimse = pseudonyms["dimse"]
    assert _lookup(archive, "--issuer", issuer_b, "MRNDIMSE1") == [["MRNDIMSE1", dimse["B"]]]
    assert _lookup(archive, "--issuer", issuer_a, "MRNDIMSE1") == [["MRNDIMSE1", dimse["A"]]]
    assert _lookup(archive, "MRNDIMSE1") == [["MRNDIMSE1", dimse["A"]]]  # the default issuer
    assert _lookup(archive, "--issuer", "OTHER", "MRNDIMSE1") == [["MRNDIMSE1", "not found"]]
    sheet = tmp_path / "ids.csv"
    sheet.write_text(f"PatientID,IssuerOfPatientID\nMRNSTOW01,{issuer_b}\nMRNSTOW01,\n")
    as_csv = run(archive, "lookup", "--site", "hospital", "--csv", str(sheet))
    assert as_csv.stdout.splitlines() == [
        "PatientID,IssuerOfPatientID,pseudonym",
        f"MRNSTOW01,{issuer_b},{pseudonyms['stow']['B']}", f"MRNSTOW01,,{pseudonyms['stow']['A']}",
    ]

    # the deid dry run files them the same way
    source = tmp_path / "dry"
    source.mkdir()
    for label, issuer in (("a", issuer_a), ("b", issuer_b)):
        [path] = corpus.study(corpus.patient("MRNDIMSE1", issuer), day, slices=1)
        shutil.copy(path, source / f"{label}.dcm")
    dry = run(archive, "deid", str(source), str(tmp_path / "dry-out"), "--site", "hospital")
    assert dry.returncode == 0, dry.stderr
    assert {label: str(pydicom.dcmread(tmp_path / "dry-out" / f"{label}.dcm").PatientID)
            for label in "ab"} == {"a": dimse["A"], "b": dimse["B"]}

    # rebuild-index: the same pseudonyms, and returning patients find theirs again
    before = _pseudonyms(archive)
    assert archive.stop() == 0
    shutil.rmtree(archive.data_dir / "pg")
    rebuilt = subprocess.run(archive.command("rebuild-index"), capture_output=True, text=True,
                             timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "patients without an allocation record: 0" in rebuilt.stdout
    archive.start()
    assert _pseudonyms(archive) == before
    for label, issuer in (("B", issuer_b), ("A", issuer_a), ("none", "")):
        again = corpus.study(corpus.patient("MRNDIMSE1", issuer), day, slices=1)
        assert _pseudonym_of_new_study(archive, lambda f=again: _by_dimse(archive, f)) == \
            dimse[label], label

    assert archive.stop() == 0
    for path in [*archive.data_dir.rglob("*"), archive.log_path]:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert issuer_a.encode() not in data and issuer_b.encode() not in data, path


def test_a_patient_from_before_issuers_is_claimed_once_by_senders_at_once(
    make_archive, corpus: PhiCorpus
):
    archive = make_archive("claim")
    day = dt.date(2022, 2, 2)
    legacy = _pseudonym_of_new_study(archive, lambda: _by_dimse(
        archive, corpus.study(corpus.patient("MRNLEGACY"), day, slices=1)))  # today's key
    first = corpus.study(corpus.patient("MRNLEGACY", corpus.corpus.plant("ISSUERONE1")), day,
                         slices=3)
    second = corpus.study(corpus.patient("MRNLEGACY", corpus.corpus.plant("ISSUERTWO2")), day,
                          slices=3)
    before = _pseudonyms(archive)
    with ThreadPoolExecutor(2) as pool:  # two associations at once
        list(pool.map(lambda files: _by_dimse(archive, files), [first, second]))
    new = {uid: p for uid, p in _pseudonyms(archive).items() if uid not in before}
    assert len(new) == 2
    assert sorted(new.values()).count(legacy) == 1  # one claim; the other issuer is split
    # objects without an issuer still go to the legacy patient
    assert _pseudonym_of_new_study(archive, lambda: _by_dimse(
        archive, corpus.study(corpus.patient("MRNLEGACY"), day, slices=1))) == legacy
