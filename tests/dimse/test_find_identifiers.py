"""C-FIND response identifiers encoded from DICOM JSON (`dimse.identifiers`) against pydicom's
path, the reference: byte for byte, in Implicit and Explicit VR Little Endian, for the archive's
query keys and for every attribute of real objects (pydicom's test files, a synthetic corpus
with planted identifiers), present or not in the match."""

from __future__ import annotations

import datetime as dt
import random

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from ricord_archive.dicom.json import to_json
from ricord_archive.dimse import identifiers
from ricord_archive.dimse.messages import encoded
from ricord_archive.dimse.server import _answers, _response
from ricord_archive.search.model import KEYS

pytestmark = pytest.mark.slow  # every pydicom test file, both encoders

CONTEXTS = {
    name: build_context(StudyRootQueryRetrieveInformationModelFind, [syntax])
    for name, syntax in (("implicit", ImplicitVRLittleEndian), ("explicit", ExplicitVRLittleEndian))
}


def _documents(corpus) -> list[dict]:
    datasets = []
    for path in get_testdata_files("*.dcm"):
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception:  # a deliberately broken test file: not a document the index holds
            continue
    for day in range(6):
        for path in corpus.study(corpus.patient(), dt.date(2020, 1, 1 + day), slices=1):
            datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
    documents = []
    for dataset in datasets:
        try:
            documents.append(to_json(dataset, "/x"))
        except Exception:
            continue
    return documents


def _keys(level: str, tags: list[int]) -> Dataset:
    keys = Dataset()
    keys.QueryRetrieveLevel = level
    for tag in sorted(set(tags)):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr != "SQ":
            keys.add_new(tag, vr, None)
    return keys


def _reference(keys: Dataset, document: dict, context) -> bytes:
    wanted = [f"{element.tag:08X}" for element in keys]
    found = Dataset.from_json({t: document[t] for t in wanted if t in document})
    return encoded(_response(keys, found), context)


def test_both_paths_encode_every_match_alike(corpus):
    documents = _documents(corpus)
    assert len(documents) > 50
    archive_keys = [tag_for_keyword(key.path) for key in KEYS.values() if "." not in key.path]
    rng = random.Random(7)
    compared = fast = 0
    for document in documents:
        present = [int(tag, 16) for tag in document]
        for level, tags in (("STUDY", archive_keys),
                            ("SERIES", rng.sample(present, min(12, len(present)))),
                            ("IMAGE", [*present, 0x00100010, 0x00081030, 0x00200013])):
            keys = _keys(level, tags)
            requested = [(e.tag, e.VR) for e in keys
                         if e.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet")]
            for name, context in CONTEXTS.items():
                reference = _reference(keys, document, context)
                answer = identifiers.identifier(requested, level, document,
                                                name == "implicit") \
                    if identifiers.encodable(requested) else None
                compared += 1
                if answer is not None:
                    fast += 1
                    assert answer == reference, (name, level)
                assert _answers(keys, context)(document) == reference
    assert fast > compared // 2  # the fast path is the common case, not a rare one


@pytest.mark.parametrize("element", [
    {"vr": "PN", "Value": [{"Alphabetic": "Doe^J", "Ideographic": "X"}]},
    {"vr": "LO", "Value": ["Müller"]},
    {"vr": "DS", "Value": [0.5]},
    {"vr": "OB", "InlineBinary": "AAAA"},
    {"vr": "US", "Value": [70000]},
    {"vr": "LO", "Value": [None, "a"]},
])
def test_what_the_fast_path_cannot_match_exactly_goes_to_pydicom(element):
    assert identifiers.identifier([(0x00101000, "LO")], "STUDY", {"00101000": element},
                                  implicit=True) is None
