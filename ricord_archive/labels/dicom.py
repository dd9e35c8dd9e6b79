"""Labels as DICOM objects that viewers show (pure: no I/O).

For each reader and series with local annotations, a binary DICOM Segmentation: one segment per
label, coded as the label is, its polygons, free-form outlines, boxes and masks rasterised on
the frames they were drawn on, referencing the series' instances. For each reader and
examination with global labels, a Comprehensive 3D SR following TID 1500 holding them as coded
qualitative evaluations. Both are built with highdicom from the archive's de-identified
instances only, so they carry nothing the archive does not already hold.

Their UIDs are keyed hashes of (kind, reader, series or study): building them again after a
corrected import gives the same SOP Instance UID, which replaces the object instead of adding
a copy. Their content date and time are the (already shifted) study's, so an unchanged object
is built to the same bytes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from ricord_archive import __version__
from ricord_archive.deid import Keyring
from ricord_archive.labels.model import Annotation, AnnotationMode, Code, Label, LabelType

MANUFACTURER = "ricord-archive"
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
# Segment category (CID 7150) and the concept each global label answers (TID 1501's
# qualitative evaluation: "Finding" = the label's code).
CATEGORY = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
FINDING = CodedConcept("121071", "DCM", "Finding")
PROCEDURE = CodedConcept("363679005", "SCT", "Imaging")
AREAS = frozenset({AnnotationMode.POLYGON, AnnotationMode.FREEFORM, AnnotationMode.BBOX,
                   AnnotationMode.MASK})
# The archive's own label objects: never evidence or sources of another label object.
OWN_SOP_CLASSES = frozenset({
    UID("1.2.840.10008.5.1.4.1.1.66.4"),  # Segmentation Storage
    UID("1.2.840.10008.5.1.4.1.1.88.33"),  # Comprehensive SR Storage
    UID("1.2.840.10008.5.1.4.1.1.88.34"),  # Comprehensive 3D SR Storage
})


class Kind(StrEnum):
    SEG = "SEG"
    SR = "SR"


@dataclass(frozen=True)
class Target:
    """One object to build: a reader's SEG of a series, or a reader's SR of an examination."""

    kind: Kind
    reader: str
    study_uid: str
    series_uid: str | None  # the annotated series (SEG); None for an SR
    annotations: tuple[Annotation, ...]

    @property
    def scope(self) -> tuple[str, ...]:
        """The study (SR) or series (SEG) whose instances the object is built from."""
        return (self.study_uid,) if self.series_uid is None else (self.study_uid,
                                                                  self.series_uid)


@dataclass(frozen=True)
class Plan:
    targets: list[Target]
    skipped: Counter[str]  # reason -> number of annotations left out


@dataclass(frozen=True)
class Built:
    dataset: Dataset
    skipped: Counter[str] = field(default_factory=Counter)


class LabelObjectError(ValueError):
    """A SEG or SR cannot be built from these annotations and sources."""


def plan(annotations: Iterable[Annotation], labels: Mapping[str, Label]) -> Plan:
    """Group annotations into the objects to build; count those no object can hold."""
    segs: dict[tuple[str, str, str], list[Annotation]] = defaultdict(list)
    srs: dict[tuple[str, str], list[Annotation]] = defaultdict(list)
    skipped: Counter[str] = Counter()
    for annotation in annotations:
        label = labels.get(annotation.label_id)
        if label is None:
            skipped["unknown label"] += 1
        elif label.type is LabelType.GLOBAL:
            srs[(annotation.reader, annotation.study_uid)].append(annotation)
        elif label.mode not in AREAS:
            skipped[f"{label.mode} is not an area"] += 1
        elif annotation.series_uid is None or annotation.sop_uid is None:
            skipped["local annotation not on an instance"] += 1
        else:
            segs[(annotation.reader, annotation.study_uid, annotation.series_uid)].append(
                annotation)
    targets = [Target(Kind.SEG, r, st, se, tuple(a)) for (r, st, se), a in sorted(segs.items())]
    targets += [Target(Kind.SR, r, st, None, tuple(a)) for (r, st), a in sorted(srs.items())]
    return Plan(targets, skipped)


def derived_uid(keys: Keyring, target: Target, role: str) -> str:
    """A `2.25` UID keyed on (kind, reader, series or study, role): the same for every build."""
    digest = keys.digest("label-object", target.kind, target.reader, *target.scope, role)
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def build(target: Target, labels: Mapping[str, Label], sources: Sequence[Dataset],
          keys: Keyring) -> Built:
    """The SEG or SR of `target` from the de-identified `sources` (the series' or the study's
    instances; pixel data is not needed); LabelObjectError when none can be built."""
    sources = [s for s in sources if UID(s.SOPClassUID) not in OWN_SOP_CLASSES]
    if not sources:
        raise LabelObjectError("no source instance in the archive")
    try:
        if target.kind is Kind.SEG:
            return segmentation(target, labels, sources, keys)
        return Built(report(target, labels, sources, keys))
    except LabelObjectError:
        raise
    except ValueError as exc:  # highdicom's checks of the sources (sizes, geometry, ...)
        raise LabelObjectError(f"the sources do not make a valid {target.kind} "
                               f"({type(exc).__name__})") from exc


def _person(reader: str) -> str:
    """A reader code as a person name (one component, made explicit by the caret)."""
    return f"{reader}^"


def _concept(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme, code.meaning)


def _dates(source: Dataset) -> dict[str, Any]:
    """The series and content date and time: the (shifted) study's, when it names them."""
    date, time = source.get("StudyDate") or None, source.get("StudyTime") or None
    return {"series_date": date, "series_time": time, "content_date": date,
            "content_time": time}


def _pinned(dataset: Dataset, uid: str | None = None) -> Dataset:
    """`dataset` with what highdicom stamps from the clock or draws at random (creation and
    contribution times, a SEG's dimension organisation UID) set from its content date and
    time and `uid`, so that the same content is always built to the same bytes."""
    date, time = dataset.get("ContentDate"), dataset.get("ContentTime")
    if date and time:
        dataset.InstanceCreationDate, dataset.InstanceCreationTime = date, time
        for item in dataset.get("ContributingEquipmentSequence") or ():
            if "ContributionDateTime" in item:
                item.ContributionDateTime = f"{date}{time}"
    for name in ("DimensionOrganizationSequence", "DimensionIndexSequence") if uid else ():
        for item in dataset.get(name) or ():
            item.DimensionOrganizationUID = uid
    return dataset


def _rings(annotation: Annotation, mode: AnnotationMode) -> list[tuple[list[tuple], int]]:
    """The polygons of an area annotation, each with the value it paints (1, or 0 for a
    mask's background); ValueError when the geometry is not MD.ai's for that mode."""
    data = annotation.geometry or {}
    if mode is AnnotationMode.BBOX:
        x, y, w, h = (float(data[k]) for k in ("x", "y", "width", "height"))
        if w <= 0 or h <= 0:
            raise ValueError("empty box")
        return [([(x, y), (x + w, y), (x + w, y + h), (x, y + h)], 1)]
    if mode is AnnotationMode.MASK:
        return ([(_points(p), 1) for p in data["foreground"]]
                + [(_points(p), 0) for p in data.get("background") or ()])
    return [(_points(data["vertices"]), 1)]


def _points(vertices: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    points = [(float(x), float(y)) for x, y in vertices]
    if len(points) < 3:
        raise ValueError("fewer than three vertices")
    return points


def rasterise(annotation: Annotation, mode: AnnotationMode, into: np.ndarray) -> None:
    """Paint an area annotation (pixel coordinates: x the column, y the row) into `into`."""
    image = Image.fromarray(into.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for points, value in _rings(annotation, mode):
        draw.polygon(points, fill=value, outline=value)
    into[...] = np.asarray(image, dtype=bool)


def segmentation(target: Target, labels: Mapping[str, Label], sources: Sequence[Dataset],
                 keys: Keyring) -> Built:
    """A binary SEG of the reader's annotations on one series: one segment per label."""
    multiframe = [s for s in sources if int(s.get("NumberOfFrames") or 1) > 1]
    if multiframe and len(sources) > 1:
        raise LabelObjectError("a series of several multi-frame instances")
    frames = {(str(s.SOPInstanceUID), 1): n for n, s in enumerate(sources)}
    if multiframe:
        uid = str(sources[0].SOPInstanceUID)
        frames = {(uid, n + 1): n for n in range(int(sources[0].NumberOfFrames))}
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    segment_labels = sorted({a.label_id for a in target.annotations},
                            key=lambda i: (labels[i].name, i))
    number = {label_id: n for n, label_id in enumerate(segment_labels)}
    pixels = np.zeros((len(frames), rows, columns, len(segment_labels)), dtype=bool)
    skipped: Counter[str] = Counter()
    painted: set[str] = set()
    for annotation in target.annotations:
        frame = frames.get((str(annotation.sop_uid), annotation.frame or 1))
        if frame is None:
            skipped["frame not in the archive"] += 1
            continue
        layer = pixels[frame, :, :, number[annotation.label_id]]
        try:
            rasterise(annotation, labels[annotation.label_id].mode, layer)
        except (KeyError, TypeError, ValueError):
            skipped["geometry not readable"] += 1
            continue
        painted.add(annotation.label_id)
    if not painted or not pixels.any():
        raise LabelObjectError("no annotation could be drawn")
    kept = [label_id for label_id in segment_labels if label_id in painted]
    pixels = pixels[..., [number[label_id] for label_id in kept]]
    descriptions = [_segment(n, labels[label_id], keys, target)
                    for n, label_id in enumerate(kept, start=1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(keys, target, "series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid(keys, target, "instance"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=MANUFACTURER,
        software_versions=__version__, device_serial_number="0",
        content_label="LABELS", content_description=f"Annotations of {target.reader}",
        content_creator_name=_person(target.reader),
        series_description=f"Segmentation {target.reader}", **_dates(sources[0]),
    )
    return Built(_pinned(seg, derived_uid(keys, target, "dimensions")), skipped)


def _segment(number: int, label: Label, keys: Keyring, target: Target) -> Any:
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label.name[:64],
        segmented_property_category=CATEGORY, segmented_property_type=_concept(label.code),
        algorithm_type="MANUAL", tracking_id=label.name[:64],
        tracking_uid=derived_uid(keys, target, f"segment:{label.id}"),
        display_color=hd.color.CIELabColor.from_string(label.colour) if label.colour
        else None,
    )


def report(target: Target, labels: Mapping[str, Label], sources: Sequence[Dataset],
           keys: Keyring) -> Dataset:
    """A TID 1500 measurement report of the reader's global labels on one examination."""
    chosen = sorted({a.label_id for a in target.annotations}, key=lambda i: (labels[i].name, i))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(keys, target, "tracking"), identifier=f"Labels {target.reader}"),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FINDING,
                                                             _concept(labels[i].code))
                                 for i in chosen],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=_person(target.reader)),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=PROCEDURE, imaging_measurements=[group],
    )
    return _pinned(hd.sr.Comprehensive3DSR(
        evidence=sources, content=content,
        series_instance_uid=derived_uid(keys, target, "series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(keys, target, "instance"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=True,
        series_description=f"Labels {target.reader}", **_dates(sources[0]),
    ))
