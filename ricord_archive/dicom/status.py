"""The DIMSE status codes the archive answers and reads (PS3.4 Annex B and C, PS3.7 Annex C):
the one set every protocol adapter, service and error uses. pynetdicom's `Status` names the
service-independent ones; the others are checked against its per-service tables (tests)."""

from __future__ import annotations

from typing import Final

from pynetdicom.status import Status

SUCCESS: Final = int(Status.SUCCESS)
PENDING: Final = int(Status.PENDING)
PENDING_WARNING: Final = 0xFF01  # C-FIND: matches are continuing, warning
CANCEL: Final = int(Status.CANCEL)
MOVE_DESTINATION_UNKNOWN: Final = int(Status.MOVE_DESTINATION_UNKNOWN)

PROCESSING_FAILURE: Final = 0x0110
DUPLICATE_SOP_INSTANCE: Final = 0x0111
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
NOT_AUTHORIZED: Final = 0x0124
OUT_OF_RESOURCES: Final = 0xA700
OUT_OF_RESOURCES_MATCHES: Final = 0xA701  # unable to calculate the number of matches
SUB_OPERATIONS_FAILED: Final = 0xA702  # out of resources: unable to perform sub-operations
IDENTIFIER_MISMATCH: Final = 0xA900  # data set (identifier) does not match SOP class
UNABLE_TO_PROCESS: Final = 0xC000  # cannot understand
SUB_OPERATIONS_WARNING: Final = 0xB000  # sub-operations complete, one or more failures
ELEMENT_DISCARDED: Final = 0xB006  # C-STORE warning: stored, an element discarded

