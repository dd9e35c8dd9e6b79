"""The HTTP adapter: DICOMweb (STOW-RS, QIDO-RS, WADO-RS) over aiohttp. Thin: protocol in,
protocol out; the work is done by the ingest, query and retrieve services."""
