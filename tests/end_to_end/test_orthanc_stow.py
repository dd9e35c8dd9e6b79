"""Orthanc 1.10 (Debian's orthanc and orthanc-dicomweb) as a hospital PACS that pushes a study
to the archive by STOW-RS from its own DICOMweb client (/dicom-web/servers/{name}/stow): a
73-character multipart boundary in a chunked body. Orthanc runs on loopback in a temporary
folder with a configuration the test writes; it has no bind-address option, so a small
LD_PRELOAD shim (tests/data/loopback_bind.c, compiled here) keeps it on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests import DATA
from tests.conftest import Archive, every_instance, free_port
from tests.phi_corpus import PhiCorpus

pytestmark = pytest.mark.slow  # Orthanc as the STOW-RS client

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SHIM_SOURCE = DATA / "loopback_bind.c"
START_DEADLINE = 60.0
SLICES = 3


def _listens_on_loopback_only(port: int) -> bool:
    """Whether every listening TCP socket on `port` is bound to 127.0.0.1 or ::1."""
    found = []
    for table, loopback in (("/proc/net/tcp", "0100007F"),
                            ("/proc/net/tcp6", "00000000000000000000000001000000")):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address == loopback)
    return bool(found) and all(found)


@pytest.fixture
def orthanc(tmp_path, make_archive) -> Iterator[tuple[str, Archive]]:
    """(Orthanc's REST root, the archive it knows as DICOMweb server "ricord")."""
    archive = make_archive()
    shim = tmp_path / "loopback_bind.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM_SOURCE), "-ldl"],
                   check=True, capture_output=True)
    port = free_port()
    config = {
        "Name": "HOSPITAL-PACS",
        "StorageDirectory": str(tmp_path / "storage"),
        "IndexDirectory": str(tmp_path / "index"),
        "Plugins": [DICOMWEB_PLUGIN],
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,  # only its REST API and DICOMweb client are needed
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {"ricord": [f"{archive.dicomweb_url}/"]},
        },
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("wb")
    process = subprocess.Popen(
        [ORTHANC, str(tmp_path / "orthanc.json")], cwd=tmp_path, stdout=log,
        stderr=subprocess.STDOUT, env={**os.environ, "LD_PRELOAD": str(shim)},
    )
    log.close()
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            assert process.poll() is None, (tmp_path / "orthanc.log").read_text()[-2000:]
            try:
                if requests.get(f"{root}/system", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "Orthanc did not answer in time"
            time.sleep(0.1)  # polling interval, not a wait for an outcome
        assert _listens_on_loopback_only(port), "Orthanc listens beyond loopback"
        yield root, archive
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_orthanc_pushes_a_study_by_stow_rs(orthanc, tmp_path):
    root, archive = orthanc
    corpus = PhiCorpus(seed=20261205, out_dir=tmp_path / "corpus")
    patient = corpus.patient()
    files = corpus.study(patient, dt.date(2022, 5, 6), slices=SLICES)
    for path in files:
        uploaded = requests.post(f"{root}/instances", data=path.read_bytes(), timeout=30)
        assert uploaded.status_code == 200, uploaded.text
    [study] = requests.get(f"{root}/studies", timeout=30).json()

    pushed = requests.post(f"{root}/dicom-web/servers/ricord/stow",
                           json={"Resources": [study]}, timeout=120)
    assert pushed.status_code == 200, (pushed.text, archive.log()[-2000:])

    client = archive.client()
    instances = every_instance(client)
    assert len(instances) == SLICES
    [found] = client.search_for_studies()
    study_uid = found["0020000D"]["Value"][0]
    metadata = client.retrieve_study_metadata(study_uid)
    assert len(metadata) == SLICES
    answered = json.dumps(instances) + json.dumps(metadata)
    leaked = sorted(value for value in corpus.corpus.planted if value in answered)
    assert not leaked, leaked  # de-identified: no planted name, ID, date or UID came back
    assert {m["00120062"]["Value"][0] for m in metadata} == {"YES"}  # PatientIdentityRemoved
    assert found["00100020"]["Value"][0] != patient.patient_id
