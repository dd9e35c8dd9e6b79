"""A read replica: a real PostgreSQL primary and a streaming hot standby on 127.0.0.1.

Queries (QIDO-RS, C-FIND) and WADO-RS metadata are read from the standby, everything else
from the primary; that the reads really go to the standby is shown by pausing its WAL replay:
a new instance is then retrievable (primary) but not found by queries (standby) until replay
resumes. Without the standby, reads fall back to the primary and return when it is back; a
promoted standby serves as the archive's database with everything stored before."""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests

from ricord_archive import cli
from ricord_archive.config import ConfigError, load_config
from ricord_archive.runtime.processes import Workers
from tests import dcmtk
from tests.conftest import Archive, every_instance
from tests.pg_cluster import Cluster
from tests.scrape import scrape

pytestmark = pytest.mark.slow  # Debian's PostgreSQL as primary and standby

DEADLINE = 60.0  # seconds for replication, fallback and return to become visible
_MULTIPART = 'multipart/related; type="application/dicom"'
_RETRIEVE_URL = re.compile(r"/studies/([0-9.]+)/series/([0-9.]+)/instances/([0-9.]+)$")


@dataclass
class ReplicaArchive(Archive):
    """The archive on a configured primary (and replica), given as command-line flags."""

    flags: tuple[str, ...] = ()

    def command(self, *args: str) -> list[str]:
        return [*super().command(*args), *self.flags]


@pytest.fixture
def clusters(tmp_path, request) -> tuple[Cluster, Cluster]:
    """A primary and its streaming hot standby, both stopped at the end."""
    primary = Cluster(tmp_path / "primary")
    request.addfinalizer(primary.stop)
    primary.init_primary()
    standby = Cluster(tmp_path / "standby")
    request.addfinalizer(standby.stop)
    standby.init_standby_of(primary)
    return primary, standby


@pytest.fixture
def archive_on(tmp_path, request):
    def start(database_url: str, read_database_url: str | None, processes: int = 1):
        replica = ["--read-database-url", read_database_url] if read_database_url else []
        archive = ReplicaArchive(
            tmp_path / "archive", tmp_path / "archive.log",
            flags=("--database-url", database_url, *replica, "--processes", str(processes)),
        )
        request.addfinalizer(archive.stop)  # before the clusters' finalizers run
        return archive.start()

    return start


def stow(archive: Archive, path: Path) -> tuple[str, str, str]:
    """STOW-RS one file; the archive's (study, series, SOP instance) UIDs for it."""
    boundary = "replica-test"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    answer = requests.post(
        f"{archive.dicomweb_url}/studies", data=body, timeout=60,
        headers={"Content-Type": f"{_MULTIPART}; boundary={boundary}"},
    )
    assert answer.status_code == 200, answer.text
    [stored] = answer.json()["00081199"]["Value"]
    match = _RETRIEVE_URL.search(stored["00081190"]["Value"][0])
    assert match, stored
    return match.group(1), match.group(2), match.group(3)


def found_instances(archive: Archive) -> set[str]:
    """The SOP Instance UIDs QIDO-RS finds (all instances)."""
    return {d["00080018"]["Value"][0] for d in every_instance(archive.client())}


def poll(condition, what: str, deadline: float = DEADLINE) -> None:
    """Wait until `condition()` holds, at most `deadline` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"not within {deadline:.0f} s: {what}"
        time.sleep(0.1)  # polling interval, not a wait for an outcome


def reading_from_replica(archive: Archive, processes: int = 1) -> None:
    """Wait until each server process said that its reads go to the replica."""
    said = re.compile(r"reads \(queries, metadata\) go to the read replica|read replica .* is back")
    poll(lambda: len(said.findall(archive.log())) >= processes, "reads on the replica")


def replica_metrics(archive: Archive, in_use: int, fallbacks: int) -> None:
    """Wait until /metrics says whether reads go to the replica (sampled every second), and
    check how often they fell back."""
    def matches() -> bool:
        found = scrape(f"{archive.root}/metrics")
        return (found.value("ricord_read_replica_in_use") == in_use
                and found.value("ricord_read_replica_fallbacks_total") == fallbacks)

    poll(matches, f"replica in use {in_use}, {fallbacks} fallbacks")


def metadata_status(archive: Archive, uids: tuple[str, str, str]) -> int:
    study, series, sop = uids
    return requests.get(
        f"{archive.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}/metadata",
        timeout=60,
    ).status_code


def test_read_replica_url_from_file_environment_and_flag(tmp_path):
    config = tmp_path / "ricord-archive.toml"
    config.write_text('[server]\nread_database_url = "postgresql://reader@file/ricord"\n')
    assert load_config(config, env={}).read_database_url == "postgresql://reader@file/ricord"
    env = {"RICORD_READ_DATABASE_URL": "postgresql://reader@env/ricord"}
    assert load_config(config, env=env).read_database_url == "postgresql://reader@env/ricord"
    args = cli._parser().parse_args(["serve", "--config", str(config),
                                     "--read-database-url", "postgres://reader@flag/ricord"])
    assert cli._config(args).read_database_url == "postgres://reader@flag/ricord"
    assert load_config(env={}).read_database_url is None


def test_a_read_replica_url_must_be_postgresql_and_is_not_repeated(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load_config(env={"RICORD_READ_DATABASE_URL": "mysql://reader:s3cret@db/ricord"})
    assert "read_database_url" in str(refused.value)
    assert "s3cret" not in str(refused.value)
    with pytest.raises(ConfigError, match="port") as refused:
        load_config(env={"RICORD_READ_DATABASE_URL": "postgresql://reader:s3cret@db:x/ricord"})
    assert "s3cret" not in str(refused.value)


def test_workers_are_given_the_read_replica():
    primary, replica = "postgresql://w@primary/ricord", "postgresql://r@replica/ricord"
    command = Workers(1, primary, 5, replica)._command(7)
    assert command[command.index("--database-url") + 1] == primary
    assert command[command.index("--read-database-url") + 1] == replica
    without = Workers(1, primary, 5)._command(7)
    assert "--read-database-url" not in without[without.index("--database-url"):]


def test_queries_and_metadata_are_read_from_the_standby(
    clusters, archive_on, corpus, tmp_path
):
    primary, standby = clusters
    archive = archive_on(primary.url, standby.url, processes=2)
    reading_from_replica(archive, processes=2)
    readers = ("SELECT DISTINCT application_name FROM pg_stat_activity "
               "WHERE application_name LIKE 'ricord-archive reads%'")
    assert len(standby.sql(readers).splitlines()) == 2  # both server processes read there
    assert primary.sql(readers) == ""

    first = corpus.study(corpus.patient(), dt.date(2021, 3, 4), slices=3)
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, first).stderr
    poll(lambda: len(found_instances(archive)) == 3, "the stored instances found via QIDO")
    visible = found_instances(archive)

    standby.pause_replay()
    [late] = corpus.study(corpus.patient(), dt.date(2021, 5, 6), slices=1)
    uids = stow(archive, late)
    study, series, sop = uids

    # retrieval of the bytes looks the instance up on the primary: it is there at once
    retrieved = requests.get(
        f"{archive.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": _MULTIPART}, timeout=60,
    )
    assert retrieved.status_code == 200
    assert sop.encode() in retrieved.content
    got = tmp_path / "got"
    got.mkdir()
    result = dcmtk.run("getscu", "-S", "-aet", "GETSCU", "-aec", "RICORD", "-od", str(got),
                       "127.0.0.1", str(archive.dimse_port), "-k", "QueryRetrieveLevel=STUDY",
                       "-k", f"StudyInstanceUID={study}", cwd=got)
    assert result.returncode == 0, result.stderr
    assert [pydicom.dcmread(p).SOPInstanceUID for p in got.iterdir()] == [sop]

    # queries and metadata come from the standby, which has not replayed the store yet
    for _ in range(6):  # new connections each: both server processes answer some
        assert found_instances(archive) == visible
        assert metadata_status(archive, uids) == 404
        assert dcmtk.findscu(archive.dimse_port, tmp_path / "find",
                             {"StudyInstanceUID": study}) == []

    standby.resume_replay()
    poll(lambda: found_instances(archive) == visible | {sop}, "the new instance via QIDO")
    assert metadata_status(archive, uids) == 200
    [answer] = dcmtk.findscu(archive.dimse_port, tmp_path / "find", {"StudyInstanceUID": study})
    assert answer.StudyInstanceUID == study


def test_reads_fall_back_to_the_primary_and_return_to_the_standby(
    clusters, archive_on, corpus
):
    primary, standby = clusters
    standby.stop()
    archive = archive_on(primary.url, standby.url)  # starts although the replica is down
    unavailable = f"read replica at 127.0.0.1:{standby.port} unavailable"
    assert archive.log().count(unavailable) == 1
    replica_metrics(archive, in_use=0, fallbacks=1)
    patient = corpus.patient()
    first = corpus.study(patient, dt.date(2022, 1, 2), slices=2)
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, first).stderr
    assert len(found_instances(archive)) == 2  # read from the primary, at once

    standby.start()
    caught_up = primary.sql("SELECT pg_current_wal_lsn()")  # the migrations, at least
    poll(lambda: standby.sql(f"SELECT pg_last_wal_replay_lsn() >= '{caught_up}'") == "t",
         "the standby replaying what it missed")
    standby.pause_replay()  # so that reads from the standby can be told apart
    [second] = corpus.study(patient, dt.date(2022, 2, 3), slices=1)
    _, _, sop = stow(archive, second)
    poll(lambda: sop not in found_instances(archive), "reads back on the standby")
    assert archive.log().count(f"read replica at 127.0.0.1:{standby.port} is back") == 1
    replica_metrics(archive, in_use=1, fallbacks=1)
    standby.resume_replay()
    poll(lambda: sop in found_instances(archive), "the standby replaying again")

    standby.stop()  # under the running archive: the next query falls back
    [third] = corpus.study(patient, dt.date(2022, 3, 4), slices=1)
    _, _, late = stow(archive, third)
    assert late in found_instances(archive)
    assert len(found_instances(archive)) == 4
    log = archive.log()
    assert log.count(unavailable) == 2  # once per change of state, not per query
    replica_metrics(archive, in_use=0, fallbacks=2)
    assert "postgres@" not in log  # the URL (which may hold a password) is never logged
    assert not [value for value in corpus.corpus.planted if value in log]


def test_a_promoted_standby_serves_everything_stored_before(clusters, archive_on, corpus):
    primary, standby = clusters
    archive = archive_on(primary.url, standby.url)
    reading_from_replica(archive)
    files = corpus.study(corpus.patient(), dt.date(2023, 4, 5), slices=3)
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, files).stderr
    poll(lambda: len(found_instances(archive)) == 3, "the stored instances via the standby")
    stored = found_instances(archive)
    assert standby.sql("SELECT count(*) FROM instance") == "3"  # replayed before the failover

    primary.stop()
    standby.promote()
    assert standby.sql("SELECT pg_is_in_recovery()") == "f"
    # the running archive keeps reading from the promoted server, now read-write
    assert found_instances(archive) == stored
    [extra] = corpus.study(corpus.patient(), dt.date(2023, 6, 7), slices=1)
    refused = requests.post(
        f"{archive.dicomweb_url}/studies", timeout=60,
        data=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + extra.read_bytes()
        + b"\r\n--b--\r\n",
        headers={"Content-Type": f"{_MULTIPART}; boundary=b"},
    )
    assert refused.status_code == 503  # writes need the primary, which is gone

    assert archive.stop() == 0
    archive.flags = ("--database-url", standby.url, "--processes", "1")
    archive.start()  # on the promoted server as its one database
    assert found_instances(archive) == stored
    study = next(iter(found_instances_by_study(archive)))
    retrieved = requests.get(f"{archive.dicomweb_url}/studies/{study}",
                             headers={"Accept": _MULTIPART}, timeout=60)
    assert retrieved.status_code == 200
    assert all(sop.encode() in retrieved.content for sop in stored)
    _, _, sop = stow(archive, extra)
    assert found_instances(archive) == stored | {sop}


def found_instances_by_study(archive: Archive) -> set[str]:
    answer = requests.get(f"{archive.dicomweb_url}/studies", timeout=60)
    assert answer.status_code == 200, answer.text
    return {d["0020000D"]["Value"][0] for d in answer.json()}


def test_with_both_servers_in_its_url_the_archive_follows_a_promotion(
    clusters, archive_on, corpus
):
    """A multi-host URL with target_session_attrs=read-write (libpq's syntax, which asyncpg
    follows): after a failover the running archive writes to the promoted server by itself."""
    primary, standby = clusters
    both = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
            "/ricord?target_session_attrs=read-write")
    archive = archive_on(both, None, processes=2)
    first, second = corpus.study(corpus.patient(), dt.date(2023, 8, 9), slices=2)
    stored = {stow(archive, first)[2]}
    poll(lambda: standby.sql("SELECT count(*) FROM instance") == "1", "replayed on the standby")

    primary.stop()
    standby.promote()
    poll(lambda: _stow_status(archive, second) == 200, "a store on the promoted server")
    assert len(found_instances(archive)) == 2 and stored < found_instances(archive)
    assert standby.sql("SELECT count(*) FROM instance") == "2"


def _stow_status(archive: Archive, path: Path) -> int:
    return requests.post(
        f"{archive.dicomweb_url}/studies", timeout=60,
        data=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes()
        + b"\r\n--b--\r\n",
        headers={"Content-Type": f"{_MULTIPART}; boundary=b"},
    ).status_code
