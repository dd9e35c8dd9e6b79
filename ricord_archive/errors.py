"""One exception family for archive failures.

Each kind carries its DIMSE status, its HTTP status and its STOW-RS FailureReason, so each
protocol adapter maps them in one place. Messages never contain PHI: they may reach a client.
"""

from __future__ import annotations

from ricord_archive.dicom.status import (
    DUPLICATE_SOP_INSTANCE,
    IDENTIFIER_MISMATCH,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    UNABLE_TO_PROCESS,
)


class ArchiveError(Exception):
    """Base of every failure the archive reports to a client."""

    dimse_status: int = UNABLE_TO_PROCESS
    http_status: int = 500
    failure_reason: int = PROCESSING_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # The object's SOP Class UID and its de-identified SOP Instance UID, once known.
        self.sop_class_uid: str | None = None
        self.sop_uid: str | None = None


class InvalidObject(ArchiveError):
    """The bytes are not a DICOM object the archive can process."""

    dimse_status = UNABLE_TO_PROCESS
    http_status = 400
    failure_reason = UNABLE_TO_PROCESS


class RefusedObject(ArchiveError):
    """A valid object the archive will not accept (policy), e.g. one without a PatientID.

    `reason` is a short fixed label (no PHI), counted per site in the index.
    """

    dimse_status = UNABLE_TO_PROCESS
    http_status = 409
    failure_reason = UNABLE_TO_PROCESS

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class SopClassRefused(RefusedObject):
    """An object of a SOP class the site does not accept, or that is never accepted."""

    dimse_status = SOP_CLASS_NOT_SUPPORTED
    failure_reason = SOP_CLASS_NOT_SUPPORTED


class NotAuthorized(RefusedObject):
    """An object the policy forbids whatever its class (burned-in annotation)."""

    dimse_status = NOT_AUTHORIZED
    failure_reason = NOT_AUTHORIZED


class DuplicateRefused(ArchiveError):
    """The SOP Instance UID is stored with other content and the policy is to refuse."""

    dimse_status = DUPLICATE_SOP_INSTANCE
    http_status = 409
    failure_reason = DUPLICATE_SOP_INSTANCE


class StudyMismatch(ArchiveError):
    """A STOW-RS object whose study does not match the study in the request URL."""

    dimse_status = IDENTIFIER_MISMATCH
    http_status = 409
    failure_reason = IDENTIFIER_MISMATCH


class ObjectTooLarge(ArchiveError):
    """An object or STOW-RS request over the configured size limit."""

    dimse_status = OUT_OF_RESOURCES
    http_status = 413
    failure_reason = OUT_OF_RESOURCES


class StorageUnavailable(ArchiveError):
    """The index or blob store failed: the object was not stored and may be sent again."""

    dimse_status = OUT_OF_RESOURCES
    http_status = 503
    failure_reason = OUT_OF_RESOURCES


class BadRequest(ArchiveError):
    """A malformed request: query value, identifier, UID, frame list, multipart body."""

    dimse_status = IDENTIFIER_MISMATCH
    http_status = 400


class QueryTooBroad(BadRequest):
    """An instance-level search that would read every partition of the instance table: no
    term resolves its studies, or they are more than the archive reads for one search."""

    dimse_status = OUT_OF_RESOURCES


class NotFound(ArchiveError):
    """No such study, series, instance, frame or bulk data element (in the caller's sites)."""

    dimse_status = UNABLE_TO_PROCESS
    http_status = 404


class NotAcceptable(ArchiveError):
    """No media type or transfer syntax the client accepts can be produced."""

    http_status = 406


class UnsupportedMediaType(ArchiveError):
    """A STOW-RS body that is not multipart/related of application/dicom parts."""

    http_status = 415


class Gone(ArchiveError):
    """What was asked for existed and no longer does (e.g. a frozen object since replaced)."""

    http_status = 410


class IndexFailure(Exception):
    """The index failed (a refused statement or a lost server), raised by `index/` instead of
    the database driver's errors; the services turn it into an ArchiveError (never shown as
    is: its text names only the driver's error class)."""


class IndexUnavailable(IndexFailure):
    """The index's database is lost or unreachable: what was asked may be asked again."""
