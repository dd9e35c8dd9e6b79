"""Many senders, one study: DIMSE associations (pynetdicom in threads and DCMTK storescu
processes) and STOW-RS clients all send the same study several times, at the same moment.

The index ends with one pseudonymous patient, one study, one series and each instance once,
its counters equal to count(*); no sender ever sees anything but success (C-STORE 0x0000,
STOW-RS 200): no deadlock, serialization failure or unique violation reaches a client, and
no blob is left behind by the duplicates.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests import dcmtk, load
from tests.conftest import Archive

pytestmark = pytest.mark.slow  # many concurrent senders

SLICES = 50
PYNETDICOM_SENDERS, STORESCU_SENDERS, STOW_SENDERS = 15, 5, 20
PASSES = 5  # each sender sends the whole study this many times, as issue #7 asks
STOW_BATCH = 10


def pynetdicom_sender(archive: Archive, files: list[Path], number: int, start: threading.Barrier,
                      statuses: list) -> None:
    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title=f"MANY{number:02d}")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 120
    start.wait()
    for _ in range(PASSES):
        assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title="RICORD")
        if not assoc.is_established:
            statuses.append(("association", "not established"))
            continue
        try:
            for dataset in datasets:
                status = assoc.send_c_store(dataset)
                statuses.append(("c-store", status.Status if "Status" in status else None))
        finally:
            assoc.release()


def storescu_sender(archive: Archive, files: list[Path], number: int, start: threading.Barrier,
                    statuses: list) -> None:
    start.wait()
    for _ in range(PASSES):
        result = dcmtk.storescu(archive.dimse_port, files, calling=f"DCMTK{number:02d}")
        outcomes = load.storescu_outcomes(result.stderr)
        statuses += [("storescu", outcomes.get(path, "no response")) for path in files]


def stow_sender(archive: Archive, files: list[Path], start: threading.Barrier,
                statuses: list) -> None:
    parts = [path.read_bytes() for path in files]
    session = requests.Session()
    start.wait()
    for _ in range(PASSES):
        for first in range(0, len(parts), STOW_BATCH):
            response = load.stow(session, archive, parts[first:first + STOW_BATCH], timeout=300)
            statuses.append(("stow", response.status_code))
            if response.status_code == 200:
                assert len(load.referenced_uids(response.json())) == STOW_BATCH


def test_one_study_from_forty_senders_at_once(make_archive, corpus):
    files = corpus.study(corpus.patient(), dt.date(2021, 2, 3), slices=SLICES)
    archive = make_archive()
    senders = PYNETDICOM_SENDERS + STORESCU_SENDERS + STOW_SENDERS
    start = threading.Barrier(senders)
    statuses: list[list] = [[] for _ in range(senders)]
    threads = [threading.Thread(target=pynetdicom_sender,
                                args=(archive, files, n, start, statuses[n]))
               for n in range(PYNETDICOM_SENDERS)]
    threads += [threading.Thread(target=storescu_sender,
                                 args=(archive, files, n, start, statuses[n]))
                for n in range(PYNETDICOM_SENDERS, PYNETDICOM_SENDERS + STORESCU_SENDERS)]
    threads += [threading.Thread(target=stow_sender, args=(archive, files, start, statuses[n]))
                for n in range(PYNETDICOM_SENDERS + STORESCU_SENDERS, senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a sender did not finish"

    flat = [status for per_sender in statuses for status in per_sender]
    expected = {"c-store": 0, "storescu": "Success", "stow": 200}
    failures = [status for status in flat if expected.get(status[0]) != status[1]]
    assert not failures, f"{len(failures)} failures, e.g. {failures[:10]}\n" + \
        "\n".join(line for line in archive.log().splitlines() if " INFO " not in line)[-5000:]
    per_object = PASSES * (PYNETDICOM_SENDERS + STORESCU_SENDERS)
    assert len(flat) == SLICES * per_object + PASSES * STOW_SENDERS * SLICES // STOW_BATCH

    [patient] = load.query(archive, "SELECT pseudonym FROM patient")
    [study] = load.query(archive, """
        SELECT st.modalities, (SELECT count(*) FROM instance WHERE study_pk = st.pk) AS rows,
               (SELECT count(*) FROM series WHERE study_pk = st.pk) AS series
        FROM study st""")
    assert tuple(study) == (["CT"], SLICES, 1)
    # the counts QIDO-RS and C-FIND answer: the tally rows of the concurrent sessions add up
    [tally] = load.query(archive, """
        SELECT count(DISTINCT study_pk), count(DISTINCT series_pk), sum(instances)
        FROM instance_tally""")
    assert tuple(tally) == (1, 1, SLICES)
    indexed = load.indexed_instances(archive)
    assert len(indexed) == SLICES
    assert load.blob_problems(archive, indexed) == []
    # every re-send wrote a blob, found its instance stored, and deleted that blob again
    assert load.blob_keys_on_disk(archive) == {row.blob_key for row in indexed.values()}
    client = archive.client()
    [qido] = client.search_for_studies(search_filters={"PatientID": patient["pseudonym"]})
    assert (qido["00201206"]["Value"], qido["00201208"]["Value"]) == ([1], [SLICES])
    [qido] = client.search_for_series(qido["0020000D"]["Value"][0])
    assert qido["00201209"]["Value"] == [SLICES]


def test_deadlock_victim_transaction_is_run_again(make_archive, corpus):
    """A deadlock between the archive's instance transaction and another writer of the index:
    PostgreSQL aborts the archive's transaction (40P01), which is run again and succeeds, so
    the sender sees Success, not 0xA700."""
    first, second = corpus.study(corpus.patient(), dt.date(2021, 2, 3), slices=2)
    archive = make_archive()
    assert load.storescu_outcomes(dcmtk.storescu(archive.dimse_port, [first]).stderr) == {
        first: "Success"}

    async def scenario() -> str:
        conn = await asyncpg.connect(load.db_url(archive))
        try:
            # the archive's sessions look for deadlocks after 5 s (so this test is surely
            # waiting in the cycle by then), this one only after 120 s: the archive's
            # transaction is the victim
            await conn.execute("ALTER SYSTEM SET deadlock_timeout = '5s'")
            await conn.execute("SELECT pg_reload_conf()")
            async with conn.transaction():
                await conn.execute("SET LOCAL deadlock_timeout = '120s'")
                await conn.execute("LOCK TABLE instance_tally IN SHARE MODE")
                sending = asyncio.ensure_future(
                    asyncio.to_thread(dcmtk.storescu, archive.dimse_port, [second]))
                # wait until the archive's transaction has inserted its instance row and
                # waits for the instance tally (its count is added last)
                deadline = time.monotonic() + 60
                while not await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> "
                        "pg_backend_pid()"):
                    assert time.monotonic() < deadline, "the archive never waited for a lock"
                    await asyncio.sleep(0.02)  # polling interval
                # close the cycle: wait for the instance table the archive's transaction
                # wrote; this returns once PostgreSQL has aborted that transaction
                await conn.execute("LOCK TABLE instance IN SHARE MODE")
            result = await sending
            await conn.execute("ALTER SYSTEM RESET deadlock_timeout")
            await conn.execute("SELECT pg_reload_conf()")
            return result.stderr
        finally:
            await conn.close()

    output = asyncio.run(scenario())
    assert load.storescu_outcomes(output) == {second: "Success"}, output
    assert "40P01" in archive.log()  # the retry said why it ran the transaction again
    [counts] = load.query(archive, "SELECT (SELECT sum(instances) FROM instance_tally), "
                          "(SELECT count(*) FROM instance)")
    assert tuple(counts) == (2, 2)


def test_concurrent_ingest_threads_do_not_change_pydicom_settings():
    """Objects prepared in several threads at once (STOW-RS parts in flight, DIMSE
    associations) are processed as one at a time would be: rtdose.dcm holds a UID pydicom
    deems invalid (tolerated on reading), which failed at random while another thread's
    DICOM JSON conversion had switched pydicom's global validation to RAISE."""
    import pydicom.config
    from pydicom.data import get_testdata_file

    from ricord_archive.deid import DeidContext, Keyring
    from ricord_archive.dicom.io import configure_pydicom, parse
    from ricord_archive.services.ingest import prepare

    saved = (pydicom.config.settings.reading_validation_mode,
             pydicom.config.settings.writing_validation_mode)
    configure_pydicom()
    try:
        sources = [Path(get_testdata_file(name)).read_bytes()
                   for name in ("rtdose.dcm", "CT_small.dcm", "MR_small.dcm", "rtdose_rle.dcm")]
        context = DeidContext("123456", "123456-000001", -100, Keyring(b"k" * 32))

        def one(data: bytes) -> str:
            prepare(parse(data, 1 << 30), context)
            return "ok"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, sources * 50))
        assert outcomes == ["ok"] * len(outcomes)
        assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
    finally:
        (pydicom.config.settings.reading_validation_mode,
         pydicom.config.settings.writing_validation_mode) = saved
