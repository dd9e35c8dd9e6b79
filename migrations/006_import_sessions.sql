-- Import sessions: while `ricord-archive import-pacs` moves studies out of a PACS, objects
-- arriving from the PACS's calling AE title for an expected study are filed under the importing
-- site, whichever node's C-STORE SCP receives them. Studies are known by a keyed hash (HMAC) of
-- their original StudyInstanceUID, never by the UID. Outcomes are counted per study so the
-- importer can report what was stored. A session that is not closed expires.

CREATE TABLE import_session (
    id           bigserial PRIMARY KEY,
    site_id      integer NOT NULL REFERENCES site (id),
    calling_aet  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX import_session_by_aet ON import_session (calling_aet, expires_at);

CREATE TABLE import_session_study (
    session_id   bigint NOT NULL REFERENCES import_session (id) ON DELETE CASCADE,
    study_key    bytea NOT NULL,
    stored       integer NOT NULL DEFAULT 0,
    duplicates   integer NOT NULL DEFAULT 0,
    refused      integer NOT NULL DEFAULT 0,
    failed       integer NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, study_key)
);
CREATE INDEX import_session_study_by_key ON import_session_study (study_key);
