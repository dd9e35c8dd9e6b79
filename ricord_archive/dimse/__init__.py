"""The DIMSE adapter: our association state machine on asyncio, pynetdicom's codecs; the
outbound SCU associations (C-MOVE sub-operations, PACS imports) are pynetdicom's, with the
race fix of `reactor_checkpoint` installed here."""

from ricord_archive.dimse import reactor_checkpoint

reactor_checkpoint.install()
