"""`ricord-archive refusals`: objects refused by policy, counted per site and reason."""

from __future__ import annotations

from typing import TextIO

from ricord_archive.archive import open_index
from ricord_archive.config import Config
from ricord_archive.index.facade import Index


async def print_refusals(config: Config, out: TextIO) -> None:
    """One `site<TAB>reason<TAB>count` line per reason seen at a site."""
    async with open_index(config, create=False) as pool:
        counts = await Index(pool).refusal_counts()
    for site, reason, count in counts:
        print(f"{site}\t{reason}\t{count}", file=out)
