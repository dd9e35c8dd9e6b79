"""Fuzzing the ingest's pure part: parse -> admit -> de-identify -> serialize, on mutated real
DICOM bytes (bit flips, truncations, length fields set to huge values, inserted elements).

Only the archive's own InvalidObject / RefusedObject may come out, and every input must finish
within a bound. Each input runs in a separate worker process with an address-space limit, so a
hang ends in a clear failure (the worker is killed) instead of a stuck test, and a huge
allocation ends in MemoryError (a failure) instead of swapping the machine.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import resource
import struct
import tempfile
import traceback
from functools import cache
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.phi_corpus import PhiCorpus

pytestmark = pytest.mark.slow  # thousands of fuzzed objects

INPUT_TIMEOUT = 20.0  # seconds one input may take (normally a few milliseconds): else a hang
MEMORY_LIMIT = 2 * 1024**3  # address space of the worker: a huge allocation fails there
OBJECT_LIMIT = 64 * 1024**2  # the archive's max_object_bytes for these inputs
HUGE = (0xFFFFFFF0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFE, 0xFFFF, 0x10000)


# ---- the worker process: runs the pipeline, answers what came out --------------------------

def _pipeline(data: bytes) -> str:
    from ricord_archive.config import SiteConfig
    from ricord_archive.deid import DeidContext, Keyring
    from ricord_archive.dicom import io as dicom_io
    from ricord_archive.errors import InvalidObject
    from ricord_archive.services.ingest import admission, prepare_object

    admitted = admission(data, OBJECT_LIMIT, SiteConfig("fuzz", default=True), True)
    if admitted.refusal is not None:
        return "refused"
    context = DeidContext("123456", "123456-000001", -100, Keyring(b"fuzz-secret-key-0123456789"))
    _, blob = prepare_object(admitted.dataset, OBJECT_LIMIT, context)
    try:  # what the archive would store must itself be a readable object
        dicom_io.parse(blob, OBJECT_LIMIT)
    except InvalidObject as exc:
        raise AssertionError("the stored bytes of an accepted object do not parse") from exc
    return "stored"


def _serve(connection) -> None:  # pragma: no cover - runs in the worker process
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    from ricord_archive.dicom.io import configure_pydicom
    from ricord_archive.errors import InvalidObject, RefusedObject

    configure_pydicom()
    while True:
        data = connection.recv_bytes()
        try:
            answer = ("ok", _pipeline(data))
        except (InvalidObject, RefusedObject) as exc:
            answer = ("ok", f"{type(exc).__name__}")
        except BaseException as exc:  # reported to the test, which fails
            answer = ("escaped", "".join(traceback.format_exception(exc)))
        connection.send(answer)


class Worker:
    """One worker process, replaced after a hang."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self.connection, child = self._context.Pipe()
        self.process = self._context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def run(self, data: bytes) -> str:
        """The outcome of one input; fails the test on an escaped exception or a hang."""
        self.connection.send_bytes(data)
        if not self.connection.poll(INPUT_TIMEOUT):
            self.process.kill()
            self.process.join()
            self._start()
            raise AssertionError(
                f"an input of {len(data)} bytes did not finish within {INPUT_TIMEOUT:.0f} s "
                f"(hang in parse/admit/de-identify/serialize); first bytes after the preamble: "
                f"{data[128:160].hex()}"
            )
        try:
            kind, detail = self.connection.recv()
        except EOFError:
            self.process.join()
            code = self.process.exitcode
            self._start()
            raise AssertionError(f"the worker died on an input (exit code {code})") from None
        assert kind == "ok", f"an exception other than InvalidObject/RefusedObject:\n{detail}"
        return detail

    def close(self) -> None:
        self.process.kill()
        self.process.join()


@pytest.fixture(scope="module")
def worker():
    running = Worker()
    yield running
    running.close()


# ---- the seed corpus: real objects, and where their elements and length fields are -----------

def _bytes_of(dataset: Dataset) -> bytes:
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


@cache
def seeds() -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = PhiCorpus(seed=7, out_dir=Path(tmp))
        [planted] = corpus.study(corpus.patient(), dt.date(2020, 5, 6), slices=1)
        generated = planted.read_bytes()
    implicit = pydicom.dcmread(BytesIO(generated))
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    found = [generated, _bytes_of(implicit)]
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                 "MR_small_jp2klossless.dcm", "nested_priv_SQ.dcm", "rtplan.dcm"):
        path = get_testdata_file(name)
        if path is not None:
            found.append(Path(path).read_bytes())
    return found


def _walk(dataset: Dataset, starts: list[int], lengths: list[tuple[int, int]]) -> None:
    """Collect, for every element still raw (not yet decoded), where its value ends (a place
    to insert an element) and the 2 and 4 bytes before its value (its length field: 4 bytes
    for implicit VR and the long explicit VRs, 2 for the short ones)."""
    for element in dataset._dict.values():
        if isinstance(element, RawDataElement) and element.value_tell is not None:
            tell = element.value_tell
            lengths += [(tell - 4, 4), (tell - 2, 2)]
            starts.append(tell + (element.length if element.length != 0xFFFFFFFF else 0))
    for element in dataset:
        if element.VR == "SQ" and element.value:
            for item in element.value:
                _walk(item, starts, lengths)


@cache
def layout(index: int) -> tuple[list[int], list[tuple[int, int]], int]:
    """Element boundaries, candidate length fields, and where the header ends (mutations
    of the header are the interesting ones; pixel data is passed through as is)."""
    data = seeds()[index]
    raw = pydicom.dcmread(BytesIO(data))
    starts: list[int] = []
    lengths: list[tuple[int, int]] = []
    _walk(raw.file_meta, starts, lengths)
    pixels = raw._dict.get(0x7FE00010)
    header_end = pixels.value_tell if isinstance(pixels, RawDataElement) else len(data)
    _walk(raw, starts, lengths)
    return sorted(set(starts)), sorted(set(lengths)), header_end


# ---- mutations ------------------------------------------------------------------------------

@st.composite
def mutated(draw) -> bytes:
    index = draw(st.integers(0, len(seeds()) - 1))
    data = bytearray(seeds()[index])
    starts, lengths, header_end = layout(index)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "length", "length", "insert", "truncate",
                                     "bytes"]))
        size = len(data)
        if size < 2:
            break
        if kind == "flip":
            at = draw(st.integers(0, min(size, header_end) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "length" and lengths:
            at, width = draw(st.sampled_from(lengths))
            if at + width <= size:
                value = draw(st.sampled_from(HUGE) | st.integers(0, 2**(8 * width) - 1))
                value &= 2**(8 * width) - 1
                order = draw(st.sampled_from("<>"))
                data[at:at + width] = struct.pack(order + ("I" if width == 4 else "H"), value)
        elif kind == "insert":
            at = draw(st.sampled_from(starts)) if starts and draw(st.booleans()) else \
                draw(st.integers(0, size))
            group = draw(st.sampled_from([0x0008, 0x0010, 0x0011, 0x0020, 0x0028, 0x7FE0,
                                          0xFFFE, 0x0002, 0x0009]))
            element = draw(st.integers(0, 0xFFFF))
            vr = draw(st.sampled_from([b"OB", b"SQ", b"UN", b"LO", b"UI", b"US", b"PN", b"UT",
                                       b"DA", b"XX"]))
            length = draw(st.sampled_from(HUGE) | st.integers(0, 64))
            value = draw(st.binary(max_size=64))
            if vr in (b"OB", b"SQ", b"UN", b"UT"):
                header = struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack(
                    "<I", length)
            else:
                header = struct.pack("<HH", group, element) + vr + struct.pack(
                    "<H", length & 0xFFFF)
            data[at:at] = header + value
        elif kind == "truncate":
            data = data[:draw(st.integers(0, size - 1))]
        elif kind == "bytes":
            at = draw(st.integers(0, min(size, header_end) - 1))
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(chunk)] = chunk
    return bytes(data)


def _small_object() -> bytes:
    """A ~500-byte valid object (no pixel data): the base of the regression seeds."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1234.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1234.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1234.3"
    ds.PatientID = "PIDFUZZSEED"
    ds.Modality = "CT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return _bytes_of(ds)


def _element(tag: tuple[int, int], vr: bytes, length: int, value: bytes = b"") -> bytes:
    head = struct.pack("<HH", *tag)
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF"):
        return head + vr + b"\0\0" + struct.pack("<I", length) + value
    if vr == b"":  # an item or delimiter: no VR
        return head + struct.pack("<I", length) + value
    return head + vr + struct.pack("<H", length) + value


HUGE_LENGTH_SEEDS = {
    # an element whose declared length runs far past the end of the data
    "OB element 0xFFFFFFF0": (_element((0x0009, 0x1010), b"OB", 0xFFFFFFF0, b"x" * 16),),
    "UN element 0xFFFFFFF0": (_element((0x0009, 0x1010), b"UN", 0xFFFFFFF0, b"x" * 16),),
    "UT element 0xFFFFFFF0": (_element((0x0008, 0x4000), b"UT", 0xFFFFFFF0, b"x" * 16),),
    "pixel data 0xFFFFFFF0": (_element((0x7FE0, 0x0010), b"OW", 0xFFFFFFF0, b"x" * 16),),
    "sequence 0xFFFFFFF0": (_element((0x0008, 0x1115), b"SQ", 0xFFFFFFF0, b"x" * 16),),
    "item 0xFFFFFFF0 in an undefined-length sequence": (
        _element((0x0008, 0x1115), b"SQ", 0xFFFFFFFF)
        + _element((0xFFFE, 0xE000), b"", 0xFFFFFFF0, b"x" * 16),
    ),
    "OB element of undefined length, never delimited": (
        _element((0x0009, 0x1010), b"OB", 0xFFFFFFFF, b"x" * 16),
    ),
}


@pytest.mark.parametrize("name", sorted(HUGE_LENGTH_SEEDS))
def test_huge_length_rejected_without_allocating(worker, name):
    """Regression seeds: a length of 0xFFFFFFF0 on a ~500-byte object is rejected as invalid
    at once (no hang, no allocation of the declared length: the worker's address space is
    limited to 2 GiB, so an attempt ends in MemoryError, which fails)."""
    data = _small_object() + HUGE_LENGTH_SEEDS[name][0]
    assert len(data) < 600
    assert worker.run(data) == "InvalidObject"


def test_huge_length_in_the_file_meta_rejected(worker):
    data = bytearray(_small_object())
    # (0002,0000) File Meta Information Group Length, UL: its value set to 0xFFFFFFF0
    assert data[128:136] == b"DICM\x02\x00\x00\x00"
    data[140:144] = struct.pack("<I", 0xFFFFFFF0)
    assert worker.run(bytes(data)) in ("InvalidObject", "stored")


def test_seeds_pass_unmutated(worker):
    """The fuzzer's starting points are real objects the pipeline stores (or refuses by
    policy): a harness on which everything fails would find nothing."""
    outcomes = [worker.run(data) for data in seeds()]
    assert outcomes.count("stored") >= 4, outcomes


@settings(max_examples=3000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=mutated())
@example(data=b"")
@example(data=b"\0" * 128 + b"DICM")
def test_mutated_objects_only_raise_archive_errors(worker, data):
    event(worker.run(data))  # outcomes in --hypothesis-show-statistics
