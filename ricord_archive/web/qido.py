"""QIDO-RS: GET /studies."""

from __future__ import annotations

import orjson
from aiohttp import web

from ricord_archive.errors import NotAcceptable
from ricord_archive.web import app as web_app
from ricord_archive.web.media import DICOM_JSON, accepts


async def search_studies(request: web.Request) -> web.Response:
    services = request.app[web_app.SERVICES]
    if not accepts(request.headers.get("Accept"), DICOM_JSON, "application/json"):
        raise NotAcceptable("QIDO-RS answers application/dicom+json")
    params = {key: request.query.getone(key) for key in request.query}
    search = await services.query.search_studies(params)
    base = web_app.base_url(request)
    for document in search.documents:
        study_uid = document["0020000D"]["Value"][0]
        document["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study_uid}"]}
    headers = {}
    warnings = [f'299 ricord-archive "ignored query key {key}"' for key in search.ignored_keys]
    if search.more:
        warnings.append(
            '299 ricord-archive "there are more matches than returned: '
            'page with limit and offset"'
        )
    if warnings:
        headers["Warning"] = ", ".join(warnings)
    return web.Response(
        body=orjson.dumps(search.documents), content_type=DICOM_JSON, headers=headers
    )
