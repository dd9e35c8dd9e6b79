"""Labels as DICOM: each reader's SEG of a CT series and SR of the examination, published into a
running archive, found by QIDO-RS, read back over WADO-RS with highdicom; publishing again
after a correction replaces them."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
import pytest

from ricord_archive.blobstore import FileBlobStore
from ricord_archive.config import load_config
from ricord_archive.deid import Keyring
from ricord_archive.errors import ArchiveError, InvalidObject, NotFound
from ricord_archive.labels.dicom import build, plan
from ricord_archive.labels.model import (
    Annotation,
    AnnotationMode,
    Code,
    Label,
    LabelType,
    Scope,
)
from ricord_archive.services.label_dicom import PROTOCOL, PublishReport
from ricord_archive.tools.label_dicom import labels_to_dicom
from ricord_archive.tools.services import archive_services, operator
from tests.conftest import Archive
from tests.ct_phantom import ct_series

SIZE = 64
SLICES = 6
READERS = ("R-0000000A", "R-0000000B", "R-0000000C")
ORIGINALS = ("LBL-PAT-1", "LBL^PATIENT", "ACC00007")


def label(id: str, name: str, type: LabelType, mode: AnnotationMode | None,
          code: Code, colour: str | None = None) -> Label:
    scope = Scope.STUDY if type is LabelType.GLOBAL else Scope.INSTANCE
    return Label(id, name, "G_test", scope, type, mode, colour, None, code)


LABELS = {label.id: label for label in (
    label("L_opacity", "Infectious opacity", LabelType.LOCAL, AnnotationMode.FREEFORM,
          Code("99RICORD", "R0001", "Infectious opacity"), "#ff0000"),
    label("L_atelectasis", "Atelectasis", LabelType.LOCAL, AnnotationMode.POLYGON,
          Code("SCT", "46621007", "Atelectasis"), "#00ff00"),
    label("L_nodule", "Noninfectious nodule/mass", LabelType.LOCAL, AnnotationMode.BBOX,
          Code("99RICORD", "R0005", "Noninfectious nodule/mass")),
    label("L_line", "Measurement", LabelType.LOCAL, AnnotationMode.LINE,
          Code("99RICORD", "R0099", "Measurement")),
    label("G_typical", "Typical Appearance", LabelType.GLOBAL, None,
          Code("99RICORD", "R0101", "Typical appearance")),
    label("G_indeterminate", "Indeterminate Appearance", LabelType.GLOBAL, None,
          Code("99RICORD", "R0102", "Indeterminate appearance")),
    label("G_ett", "Endotracheal tube", LabelType.GLOBAL, None,
          Code("SCT", "26412008", "Endotracheal tube")),
)}


def square(x: int, y: int, side: int) -> dict:
    return {"vertices": [[x, y], [x + side, y], [x + side, y + side], [x, y + side]]}


def diamond(cx: int, cy: int, r: int) -> dict:
    return {"vertices": [[cx, cy - r], [cx + r, cy], [cx, cy + r], [cx - r, cy]]}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    base = tmp_path_factory.mktemp("labels")
    archive = Archive(base / "data", base / "archive.log").start()
    yield archive
    archive.stop()


@pytest.fixture(scope="module")
def ct(archive) -> dict:
    """The CT series as the archive holds it: study, series, and SOP UIDs by slice (1-based)."""
    client = archive.client()
    client.store_instances(ct_series(ORIGINALS[0], ORIGINALS[1], "20210304", SLICES, SIZE,
                                     seed=7))
    [study] = client.search_for_studies(fields=["PatientID"])
    study_uid = study["0020000D"]["Value"][0]
    found = [pydicom.Dataset.from_json(i) for i in client.search_for_instances(
        study_uid, fields=["InstanceNumber", "SeriesInstanceUID"])]
    by_slice = {int(i.InstanceNumber): str(i.SOPInstanceUID) for i in found}
    assert sorted(by_slice) == list(range(1, SLICES + 1))
    return {"study": study_uid, "series": str(found[0].SeriesInstanceUID), "slices": by_slice,
            "pseudonym": study["00100020"]["Value"][0]}


def annotations(ct: dict, corrected: bool = False) -> list[Annotation]:
    study, series, slices = ct["study"], ct["series"], ct["slices"]
    items: list[tuple[str, str | None, int | None, str, dict | None]] = [
        # reader A: opacity outlined over three slices (the third moved from 4 to 6 in the
        # correction), atelectasis on slice 3 (removed in the correction), a nodule box
        ("L_opacity", series, 2, READERS[0], square(10, 10, 20)),
        ("L_opacity", series, 3, READERS[0], diamond(32, 32, 12)),
        ("L_opacity", series, 6 if corrected else 4, READERS[0], square(40, 8, 10)),
        ("L_nodule", series, 5, READERS[0], {"x": 20, "y": 40, "width": 8, "height": 4}),
        # reader B: one outline
        ("L_opacity", series, 3, READERS[1], square(5, 40, 6)),
        # not drawable: a line; an instance the archive does not hold
        ("L_line", series, 3, READERS[1], {"vertices": [[1, 1], [9, 9]]}),
        ("L_opacity", series, None, READERS[1], square(5, 5, 5)),
        # global labels of the examination by three readers
        ("G_typical", None, None, READERS[0], None),
        ("G_ett", None, None, READERS[0], None),
        ("G_typical", None, None, READERS[1], None),
        ("G_indeterminate", None, None, READERS[2], None),
    ]
    if not corrected:
        items.append(("L_atelectasis", series, 3, READERS[0], square(44, 44, 10)))
    unknown = "2.25.1"  # an instance the archive does not hold
    return [
        Annotation(f"A{n}", label_id, study, series_uid,
                   None if series_uid is None else slices[number] if number else unknown,
                   None, reader, geometry, None)
        for n, (label_id, series_uid, number, reader, geometry) in enumerate(items)
    ]


def publish(archive: Archive, items: Sequence[Annotation],
            labels: Mapping[str, Label] = LABELS) -> PublishReport:
    """What `ricord-archive labels to-dicom` does, against the running archive's data."""
    config = load_config(None, env={}, overrides={"data_dir": archive.data_dir})

    async def load(index) -> tuple[Sequence[Annotation], Mapping[str, Label]]:
        return items, labels

    out = io.StringIO()
    report = asyncio.run(labels_to_dicom(config, load, out))
    assert out.getvalue().splitlines() == report.lines()
    return report


def series_of(archive: Archive, modality: str, study: str | None = None) -> list[pydicom.Dataset]:
    return [pydicom.Dataset.from_json(s) for s in archive.client().search_for_series(
        study, search_filters={"Modality": modality},
        fields=["SeriesDescription", "NumberOfSeriesRelatedInstances"])]


def retrieve_one(archive: Archive, study: str, series: str) -> pydicom.Dataset:
    client = archive.client()
    [instance] = client.search_for_instances(study, series)
    sop = instance["00080018"]["Value"][0]
    return client.retrieve_instance(study, series, sop)


def segments(archive: Archive, ct: dict, reader: str) -> tuple[hd.seg.Segmentation, dict]:
    """The reader's SEG read back over WADO-RS, and its pixels by segment label and slice."""
    [found] = [s for s in series_of(archive, "SEG", ct["study"])
               if reader in str(s.SeriesDescription)]
    seg = hd.seg.Segmentation.from_dataset(
        retrieve_one(archive, ct["study"], str(found.SeriesInstanceUID)))
    order = [ct["slices"][n] for n in range(1, SLICES + 1)]
    pixels = {}
    for number in seg.get_segment_numbers():
        description = seg.get_segment_description(number)
        array = seg.get_pixels_by_source_instance(order, segment_numbers=[number])
        pixels[description.segment_label] = {n + 1: array[n, :, :, 0] for n in range(SLICES)}
    return seg, pixels


def painted(layers: dict[int, np.ndarray]) -> list[int]:
    return [n for n, layer in layers.items() if layer.any()]


def check_square(layer: np.ndarray, x: int, y: int, side: int) -> None:
    check_box(layer, x, y, side, side)


def check_box(layer: np.ndarray, x: int, y: int, width: int, height: int) -> None:
    """The outline and its inside are painted (pixel centres on the outline included), and
    nothing else."""
    expected = np.zeros_like(layer)
    expected[y:y + height + 1, x:x + width + 1] = 1
    assert np.array_equal(layer, expected), np.argwhere(layer != expected)[:10]


def evaluations(sr: pydicom.Dataset) -> tuple[str, list[tuple[str, str]]]:
    """The observer's name and the (scheme, value) of every 'Finding' evaluation in the SR."""
    observer, found = None, []

    def walk(items) -> None:
        nonlocal observer
        for item in items:
            name = item.ConceptNameCodeSequence[0]
            if name.CodeMeaning == "Person Observer Name":
                observer = str(item.PersonName)
            if (name.CodeValue, name.CodingSchemeDesignator) == ("121071", "DCM"):
                code = item.ConceptCodeSequence[0]
                found.append((code.CodingSchemeDesignator, code.CodeValue))
            walk(item.get("ContentSequence") or [])

    walk(sr.ContentSequence)
    return observer, sorted(found)


def test_labels_published_as_seg_and_sr(archive, ct):
    report = publish(archive, annotations(ct))
    assert report.counts() == {"SEG inserted": 2, "SR inserted": 3}, report.as_dict()
    assert report.skipped == {"line is not an area": 1, "frame not in the archive": 1}
    assert report.lines()[:2] == ["SEG: 2 new, 0 replaced, 0 unchanged",
                                  "SR: 3 new, 0 replaced, 0 unchanged"]

    # QIDO-RS finds one SEG per reader of the series, one SR per reader of the examination.
    segs, srs = series_of(archive, "SEG"), series_of(archive, "SR", ct["study"])
    assert sorted(str(s.SeriesDescription) for s in segs) == [
        f"Segmentation {r}" for r in READERS[:2]]
    assert sorted(str(s.SeriesDescription) for s in srs) == [f"Labels {r}" for r in READERS]

    # Reader A's SEG: its segments, codes, frames and pixels.
    seg, pixels = segments(archive, ct, READERS[0])
    assert seg.PatientID == ct["pseudonym"] and seg.StudyInstanceUID == ct["study"]
    text = str(seg)
    assert not any(original in text for original in ORIGINALS)
    codes = {seg.get_segment_description(n).segment_label:
             seg.get_segment_description(n).segmented_property_type
             for n in seg.get_segment_numbers()}
    assert {name: (c.scheme_designator, c.value) for name, c in codes.items()} == {
        "Infectious opacity": ("99RICORD", "R0001"), "Atelectasis": ("SCT", "46621007"),
        "Noninfectious nodule/mass": ("99RICORD", "R0005")}
    assert str(seg.SegmentationType) == "BINARY"
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == set(ct["slices"].values())  # references the whole series

    opacity = pixels["Infectious opacity"]
    assert painted(opacity) == [2, 3, 4]
    check_square(opacity[2], 10, 10, 20)
    check_square(opacity[4], 40, 8, 10)
    diamond_layer = opacity[3]
    assert diamond_layer[32, 32] and diamond_layer[32, 22] and diamond_layer[22, 32]
    assert not diamond_layer[22, 22] and not diamond_layer[42, 42]  # the diamond's corners
    assert 260 <= diamond_layer.sum() <= 340  # about 2 r^2 = 288
    assert painted(pixels["Atelectasis"]) == [3]
    check_square(pixels["Atelectasis"][3], 44, 44, 10)
    assert painted(pixels["Noninfectious nodule/mass"]) == [5]
    check_box(pixels["Noninfectious nodule/mass"][5], 20, 40, 8, 4)

    _, pixels_b = segments(archive, ct, READERS[1])
    assert list(pixels_b) == ["Infectious opacity"]
    assert painted(pixels_b["Infectious opacity"]) == [3]
    check_square(pixels_b["Infectious opacity"][3], 5, 40, 6)

    # Each reader's SR holds that reader's global labels as coded evaluations.
    expected = {READERS[0]: [("99RICORD", "R0101"), ("SCT", "26412008")],
                READERS[1]: [("99RICORD", "R0101")], READERS[2]: [("99RICORD", "R0102")]}
    for series in srs:
        sr = retrieve_one(archive, ct["study"], str(series.SeriesInstanceUID))
        assert sr.SOPClassUID == hd.sr.Comprehensive3DSR.from_dataset(sr).SOPClassUID
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        observer, found = evaluations(sr)
        reader = observer.rstrip("^")
        assert found == expected[reader], reader
        assert sr.PatientID == ct["pseudonym"]


def test_publishing_again_replaces(archive, ct):
    publish(archive, annotations(ct))
    again = publish(archive, annotations(ct))
    assert again.counts() == {"SEG unchanged": 2, "SR unchanged": 3}, again.as_dict()
    before = {s.SOPInstanceUID for s in archive_instances(archive, ct["study"])}

    corrected = publish(archive, annotations(ct, corrected=True))
    assert corrected.counts() == {"SEG replaced": 1, "SEG unchanged": 1, "SR unchanged": 3}
    after = archive_instances(archive, ct["study"])
    assert {s.SOPInstanceUID for s in after} == before  # the same objects, none added
    segs = series_of(archive, "SEG", ct["study"])
    assert len(segs) == 2 and all(int(s.NumberOfSeriesRelatedInstances) == 1 for s in segs)

    _, pixels = segments(archive, ct, READERS[0])
    assert sorted(pixels) == ["Infectious opacity", "Noninfectious nodule/mass"]
    assert painted(pixels["Infectious opacity"]) == [2, 3, 6]
    check_square(pixels["Infectious opacity"][6], 40, 8, 10)
    # The replaced object's blob is gone: one blob per instance.
    assert sum(1 for _ in FileBlobStore(archive.data_dir / "blobs").walk()) == len(after)


def archive_instances(archive: Archive, study: str) -> list[pydicom.Dataset]:
    return [pydicom.Dataset.from_json(i) for i in archive.client().search_for_instances(study)]


def test_own_objects_must_name_their_study_and_pseudonym(archive, ct):
    """The trusted entry takes only objects of a study the archive holds that name its
    pseudonymous patient: one still naming an original identifier, or of an unknown study,
    is refused and nothing is stored."""
    config = load_config(None, env={}, overrides={"data_dir": archive.data_dir})
    before = archive_instances(archive, ct["study"])

    async def attempt(change: dict[str, str]) -> Exception:
        async with archive_services(config) as services:
            [(_, blob)] = await services.retrieve.instances(ct["study"], ct["series"],
                                                            ct["slices"][1])
            dataset = pydicom.dcmread(io.BytesIO(blob.read()))
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "2.25.7"
            for keyword, value in change.items():
                setattr(dataset, keyword, value)
            with pytest.raises(ArchiveError) as raised:
                await services.ingest.store_own(dataset, by=operator(), protocol=PROTOCOL)
            return raised.value

    refused = asyncio.run(attempt({"PatientID": ORIGINALS[0]}))
    assert isinstance(refused, InvalidObject) and ORIGINALS[0] not in refused.message
    assert isinstance(asyncio.run(attempt({"StudyInstanceUID": "2.25.8"})), NotFound)
    assert len(archive_instances(archive, ct["study"])) == len(before)


def test_mask_on_frames_of_a_multiframe_instance():
    """Pure: a mask with a hole on frame 3 of an enhanced (multi-frame) CT; a frame past the
    last one and an unreadable geometry are counted, not drawn."""
    slices = ct_series("P", "A^B", "20210304", slices=4, size=32)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(),
        instance_number=1)
    source = pydicom.dcmread(io.BytesIO(part10(enhanced)))
    mask = label("L_mask", "Mask", LabelType.LOCAL, AnnotationMode.MASK,
                 Code("99RICORD", "R0200", "Mask"))
    uids = (str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
            str(source.SOPInstanceUID))
    geometries = [
        (3, {"foreground": [[[2, 2], [20, 2], [20, 20], [2, 20]]],
             "background": [[[8, 8], [12, 8], [12, 12], [8, 12]]]}),
        (5, {"foreground": [[[2, 2], [20, 2], [20, 20]]]}),
        (1, {"foreground": "not polygons"}),
    ]
    items = [Annotation(f"M{n}", mask.id, *uids, frame, READERS[0], geometry, None)
             for n, (frame, geometry) in enumerate(geometries)]
    [target] = plan(items, {mask.id: mask}).targets
    built = build(target, {mask.id: mask}, [source], Keyring(b"k" * 32))
    assert built.skipped == {"frame not in the archive": 1, "geometry not readable": 1}
    seg = hd.seg.segread(io.BytesIO(part10(built.dataset)))
    pixels = seg.get_pixels_by_source_frame(uids[2], [1, 2, 3, 4], segment_numbers=[1],
                                            assert_missing_frames_are_empty=True)[..., 0]
    assert [int(frame.sum()) for frame in pixels] == [0, 0, 19 * 19 - 5 * 5, 0]
    assert pixels[2, 5, 5] and not pixels[2, 10, 10] and not pixels[2, 21, 21]


def part10(dataset: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()
