"""Clinical data around the images (issue #14), the pure part: reading a site's clinical sheet
(`sheet`), its column types and the column map (`columns`), and the export's filters and
column names (`export`). No sockets, no database; the service is `services.clinical`, the SQL
`index/clinical.py`, the adapters `web/clinical.py` and `tools/clinical.py`.

How rows meet images: a row is stored under the patient row ingest allocates (the import
allocates it, with its allocation record, when the images have not arrived) and under the keyed
StudyInstanceUID / AccessionNumber the de-identifier gives the images (`deid.rules.keyed_uid`,
`deid.rules.keyed_accession`), so no link step is needed: the view `clinical_exam`
(migrations/010) joins each row to its study on the site and the keyed study UID (or the keyed
accession number when the sheet gives no study UID), whichever arrives first.
"""
