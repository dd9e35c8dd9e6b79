"""Command-line tools over the index and the secret key: the ingest dry run (`deid`), pseudonym
`lookup` and the `refusals` report, which read the index and never write to it; and the
imports (`import`, `import-pacs`), which store through the archive's own ingest pipeline."""

from __future__ import annotations

from ricord_archive.index.facade import Index
from ricord_archive.index.store import Site


class ToolError(Exception):
    """A tool cannot run as asked; the message says why and names no DICOM value."""


async def indexed_site(index: Index, name: str) -> Site:
    """The index row of a configured site; the archive creates it when it first starts."""
    site = await index.site_named(name)
    if site is None:
        raise ToolError(
            f"site {name!r} has no SITEID in the index yet: start the archive once with this "
            "site configured (ricord-archive serve)"
        )
    return site
