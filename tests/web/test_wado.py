"""WADO-RS and WADO-URI: stored bytes, transcoding, frames, bulk data, metadata, rendering."""

from __future__ import annotations

import gzip
import hashlib
import io
from email.parser import BytesParser
from email.policy import HTTP

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian

from ricord_archive.blobstore import FileBlobStore
from tests.conftest import Archive

CONFIG = """
[[sites]]
name = "wado"
sop_classes = ["CTImageStorage", "MRImageStorage", "RTDoseStorage"]
"""
SOURCES = {
    "ct": "CT_small.dcm",  # Explicit VR Little Endian
    "j2k": "693_J2KI.dcm",  # JPEG 2000
    "rle": "MR_small_RLE.dcm",  # RLE Lossless
    "dose": "rtdose.dcm",  # Implicit VR Little Endian, 15 frames
    "dose_rle": "rtdose_rle.dcm",  # RLE Lossless, 15 frames
}
OCTET = "multipart/related; type=application/octet-stream"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    base = tmp_path_factory.mktemp("wado")
    (base / "config.toml").write_text(CONFIG)
    archive = Archive(base / "data", base / "archive.log", base / "config.toml").start()
    yield archive
    archive.stop()


@pytest.fixture(scope="module")
def stored(archive) -> dict[str, tuple[pydicom.Dataset, str]]:
    """name -> (the original dataset, the instance URL in the archive)."""
    originals = {name: pydicom.dcmread(get_testdata_file(f)) for name, f in SOURCES.items()}
    originals["dose_rle"].SOPInstanceUID = "1.2.826.0.1.3680043.10.1234.77"  # rtdose's own UID
    originals["dose_rle"].file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1234.77"
    result = archive.client().store_instances(list(originals.values()))
    urls = [item.RetrieveURL for item in result.ReferencedSOPSequence]
    assert len(urls) == len(originals)
    return {name: (ds, url) for (name, ds), url in zip(originals.items(), urls, strict=True)}


def parts(response: requests.Response) -> list[tuple[dict, bytes]]:
    """The parts of a multipart/related response as (headers, body)."""
    assert response.status_code in (200, 206), response.text[:200]
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + response.content)
    assert message.is_multipart()
    return [(dict(p.items()), p.get_payload(decode=True)) for p in message.iter_parts()]


def syntax_of(headers: dict) -> str:
    return headers["Content-Type"].params["transfer-syntax"]


def blob_bytes(archive: Archive, url: str) -> bytes:
    [(_, body)] = parts(requests.get(url, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}))
    return body


def test_transfer_syntax_star_returns_the_stored_bytes(archive, stored):
    store = FileBlobStore(archive.data_dir / "blobs")
    blobs = {hashlib.sha256(store.open(key).read()).digest() for key, _, _ in store.walk()}
    for name, (original, url) in stored.items():
        data = blob_bytes(archive, url)
        assert hashlib.sha256(data).digest() in blobs, name
        copy = pydicom.dcmread(io.BytesIO(data))
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert copy.PixelData == original.PixelData


def test_default_is_explicit_vr_little_endian_decoded(stored):
    for name, (original, url) in stored.items():
        [(headers, body)] = parts(requests.get(url, headers={
            "Accept": 'multipart/related; type="application/dicom"'}))
        assert syntax_of(headers) == ExplicitVRLittleEndian
        copy = pydicom.dcmread(io.BytesIO(body))
        assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, name
        assert np.array_equal(copy.pixel_array, original.pixel_array), name


def test_study_retrieval_streams_every_instance_with_its_syntax(stored):
    study_url = stored["dose"][1].split("/series/")[0]
    answer = parts(requests.get(study_url, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}))
    assert len(answer) == 2  # both RT doses share one study
    syntaxes = {syntax_of(h) for h, _ in answer}
    assert syntaxes == {"1.2.840.10008.1.2", "1.2.840.10008.1.2.5"}


def test_unproducible_transfer_syntax_is_406(stored):
    url = stored["ct"][1]
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    response = requests.get(url, headers={"Accept": jpeg})
    assert response.status_code == 406
    assert "transfer syntax" in response.json()["error"]
    assert requests.get(url, headers={"Accept": "image/png"}).status_code == 406


def test_native_frames_are_read_at_their_offset(stored):
    original, url = stored["dose"]
    size = original.Rows * original.Columns * original.BitsAllocated // 8
    answer = parts(requests.get(f"{url}/frames/2,5", headers={"Accept": OCTET}))
    assert [body for _, body in answer] == [
        original.PixelData[size:2 * size], original.PixelData[4 * size:5 * size]
    ]
    assert all(h["Content-Type"].content_type == "application/octet-stream" for h, _ in answer)


def test_compressed_frames_as_stored_or_decoded(stored):
    original, url = stored["dose_rle"]
    stored_frames = list(generate_frames(original.PixelData, number_of_frames=15))
    kept = parts(requests.get(f"{url}/frames/3", headers={
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}))
    assert kept[0][1] == stored_frames[2]
    assert kept[0][0]["Content-Type"].content_type == "image/dicom-rle"
    assert syntax_of(kept[0][0]) == "1.2.840.10008.1.2.5"
    decoded = parts(requests.get(f"{url}/frames/3", headers={"Accept": OCTET}))
    expected = pixel_array(original, index=2)
    assert decoded[0][1] == expected.astype(expected.dtype.newbyteorder("<")).tobytes()
    j2k_original, j2k_url = stored["j2k"]
    j2k = parts(requests.get(f"{j2k_url}/frames/1", headers={
        "Accept": 'multipart/related; type="image/jp2"'}))
    assert j2k[0][1] == next(generate_frames(j2k_original.PixelData, number_of_frames=1))


def test_dicomweb_client_default_frame_request_works(archive, stored):
    original, url = stored["ct"]
    study, series, instance = url.split("/studies/")[1].replace("/series/", "/").replace(
        "/instances/", "/").split("/")
    [frame] = archive.client().retrieve_instance_frames(study, series, instance, [1])
    assert frame == original.PixelData


@pytest.mark.parametrize(("frames", "status"), [("0", 400), ("16", 404), ("1,x", 400),
                                                  ("", 404)])
def test_bad_frame_numbers(stored, frames, status):
    response = requests.get(f"{stored['dose'][1]}/frames/{frames}", headers={"Accept": OCTET})
    assert response.status_code == status


def test_frames_of_an_instance_without_columns_are_400(archive):
    """Rows without Columns: no frame size to cut the pixel data by (was a TypeError, 500)."""
    dataset = pydicom.dcmread(get_testdata_file(SOURCES["ct"]))
    dataset.StudyInstanceUID = "1.2.826.0.1.3680043.10.1234.90"
    dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1234.91"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = (
        "1.2.826.0.1.3680043.10.1234.92")
    del dataset.Columns
    [stored] = archive.client().store_instances([dataset]).ReferencedSOPSequence
    response = requests.get(f"{stored.RetrieveURL}/frames/1", headers={"Accept": OCTET})
    assert response.status_code == 400, response.text


def test_metadata_etag_gzip_and_bulk_data(stored):
    original, url = stored["ct"]
    first = requests.get(f"{url}/metadata", headers={"Accept-Encoding": "gzip"})
    assert first.headers["Content-Encoding"] == "gzip"
    assert first.headers["Content-Type"] == "application/dicom+json"
    etag = first.headers["ETag"]
    again = requests.get(f"{url}/metadata", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = requests.get(f"{url}/metadata", headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200 and other.headers["ETag"] == etag
    raw = requests.get(f"{url}/metadata", headers={"Accept-Encoding": "gzip"}, stream=True)
    assert gzip.decompress(raw.raw.read())[:1] == b"["
    [document] = first.json()
    root = url.split("/dicom-web")[0]
    pixel_uri = document["7FE00010"]["BulkDataURI"]
    [(_, body)] = parts(requests.get(root + pixel_uri))
    assert body == original.PixelData
    [(_, piece)] = parts(requests.get(root + pixel_uri, headers={"Range": "bytes=10-19"}))
    assert piece == original.PixelData[10:20]
    assert requests.get(root + pixel_uri, headers={"Range": "bytes=999999-"}).status_code == 416


def _bulk_data_uris(document: dict) -> list[str]:
    """Every BulkDataURI of a DICOM JSON document, in sequences too."""
    found = []
    for element in document.values():
        if "BulkDataURI" in element:
            found.append(element["BulkDataURI"])
        if element["vr"] == "SQ":
            for item in element.get("Value", []):
                found += _bulk_data_uris(item)
    return found


def test_each_bulk_data_part_names_its_bulk_data_uri(archive, stored):
    """PS3.18 10.4.3.3.5: a bulk data part carries Content-Location, the URI of its element
    in the metadata, whatever spelling of the tag the request used, in a range answer too;
    dicomweb-client reads the same bytes."""
    checked = 0
    for name, (_, url) in stored.items():
        [document] = requests.get(f"{url}/metadata", timeout=30).json()
        uris = _bulk_data_uris(document)
        assert uris, name
        for uri in uris:
            [(headers, body)] = parts(requests.get(archive.root + uri, timeout=30))
            assert headers["Content-Location"] == uri
            lower = uri[:-8] + uri[-8:].lower()
            [(again, _)] = parts(requests.get(archive.root + lower, timeout=30))
            assert again["Content-Location"] == uri
            [(ranged, _)] = parts(requests.get(archive.root + uri, timeout=30,
                                               headers={"Range": "bytes=0-1"}))
            assert ranged["Content-Location"] == uri
            assert archive.client().retrieve_bulkdata(archive.root + uri) == [body]
            checked += 1
    assert checked >= len(stored)


def test_each_frame_part_names_the_uri_of_its_frame(archive, stored):
    _, url = stored["dose"]
    path = url.removeprefix(archive.root)
    answer = parts(requests.get(f"{url}/frames/5,2,9", headers={"Accept": OCTET}, timeout=30))
    assert [h["Content-Location"] for h, _ in answer] == [
        f"{path}/frames/{n}" for n in (5, 2, 9)
    ]
    for headers, body in answer:  # each location answers that frame alone
        [(_, alone)] = parts(requests.get(archive.root + headers["Content-Location"],
                                          headers={"Accept": OCTET}, timeout=30))
        assert alone == body


def _image(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text[:200]
    return Image.open(io.BytesIO(response.content))


def test_rendered_applies_window_viewport_and_media_type(stored):
    _, url = stored["ct"]
    jpeg = _image(requests.get(f"{url}/rendered"))
    assert jpeg.format == "JPEG" and jpeg.size == (128, 128)
    pixels = np.asarray(jpeg.convert("L"), dtype=float)
    assert pixels.std() > 10  # a CT slice, not a blank square
    png = _image(requests.get(f"{url}/rendered", headers={"Accept": "image/png"},
                              params={"viewport": "64,64"}))
    assert png.format == "PNG" and png.size == (64, 64)
    narrow = np.asarray(_image(requests.get(
        f"{url}/rendered", headers={"Accept": "image/png"}, params={"window": "40,80"})))
    wide = np.asarray(_image(requests.get(
        f"{url}/rendered", headers={"Accept": "image/png"}, params={"window": "40,4000"})))
    assert (narrow == 255).mean() > (wide == 255).mean()  # a narrow window saturates more
    assert requests.get(f"{url}/rendered", params={"window": "40,-1"}).status_code == 400
    assert requests.get(f"{url}/rendered", params={"quality": "0"}).status_code == 400
    assert requests.get(f"{url}/rendered", headers={"Accept": "image/gif"}).status_code == 406
    frame = _image(requests.get(f"{stored['dose'][1]}/frames/7/rendered"))
    assert frame.size == (10, 10)


def test_thumbnails_at_every_level(stored):
    _, url = stored["j2k"]
    series = url.split("/instances/")[0]
    for target in (url, series, series.split("/series/")[0]):
        image = _image(requests.get(f"{target}/thumbnail"))
        assert image.format == "JPEG" and max(image.size) <= 128


def test_wado_uri(archive, stored):
    original, url = stored["rle"]
    study, series, instance = url.split("/studies/")[1].replace("/series/", "/").replace(
        "/instances/", "/").split("/")
    query = {"requestType": "WADO", "studyUID": study, "seriesUID": series,
             "objectUID": instance}
    wado = f"{archive.root}/wado"
    dicom = requests.get(wado, params={**query, "contentType": "application/dicom"})
    assert dicom.headers["Content-Type"] == "application/dicom"
    assert dicom.content == blob_bytes(archive, url)
    explicit = requests.get(wado, params={**query, "contentType": "application/dicom",
                                          "transferSyntax": ExplicitVRLittleEndian})
    assert np.array_equal(pydicom.dcmread(io.BytesIO(explicit.content)).pixel_array,
                          original.pixel_array)
    jpeg = _image(requests.get(wado, params={**query, "columns": "32"}))
    assert jpeg.size == (32, 32)
    assert requests.get(wado, params={**query, "requestType": "X"}).status_code == 400


def test_unknown_and_malformed_uids(archive, stored):
    url = archive.dicomweb_url
    assert requests.get(f"{url}/studies/2.25.1").status_code == 404
    assert requests.get(f"{url}/studies/1.2.abc").status_code == 400
    assert requests.get(f"{url}/studies/1.2.abc/metadata").status_code == 400
    _, instance = stored["ct"]
    assert requests.get(instance.replace("/instances/", "/instances/9")).status_code == 404
