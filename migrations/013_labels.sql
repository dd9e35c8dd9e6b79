-- Expert labels (issue #15): the labelling schema (label groups and labels, each with a code)
-- and the readers' annotations on the archive's images, as MD.ai exports them.
-- Everything here is de-identified: UIDs are the archive's own, a reader is a keyed code
-- (R-XXXXXXXX, an HMAC of the MD.ai user id under the archive's secret), never an MD.ai user
-- id or e-mail address; notes (free text) are kept only when an import asked for it.

CREATE TABLE label_group (
    id               text PRIMARY KEY,      -- MD.ai's label group id, or the shipped schema's
    name             text NOT NULL
);

CREATE TABLE label (
    id               text PRIMARY KEY,      -- MD.ai's label id, or the shipped schema's
    name             text NOT NULL,
    group_id         text NOT NULL REFERENCES label_group (id),
    scope            text NOT NULL CHECK (scope IN ('STUDY', 'SERIES', 'INSTANCE')),
    type             text NOT NULL CHECK (type IN ('global', 'local')),
    annotation_mode  text CHECK (annotation_mode IN
                         ('bbox', 'polygon', 'freeform', 'line', 'location', 'mask')),
    colour           text CHECK (colour ~ '^#[0-9a-f]{6}$'),
    parent_id        text REFERENCES label (id) DEFERRABLE INITIALLY DEFERRED,
    code_scheme      text NOT NULL,         -- SCT (SNOMED CT) where one exists, else 99RICORD
    code_value       text NOT NULL,
    code_meaning     text NOT NULL
);
CREATE INDEX label_by_name ON label (name);
CREATE INDEX label_by_group ON label (group_id);

CREATE TABLE annotation (
    id               text PRIMARY KEY,      -- MD.ai's annotation id: re-imports update, never add
    label_id         text NOT NULL REFERENCES label (id),
    study_uid        text NOT NULL,         -- the archive's (de-identified) UIDs
    series_uid       text,
    sop_uid          text,
    frame            integer CHECK (frame >= 1),  -- 1-based; MD.ai's frameNumber is 0-based
    reader           text NOT NULL CHECK (reader ~ '^R-[0-9A-F]{8}$'),
    geometry         jsonb,                 -- MD.ai's `data`; NULL for a global label
    note             text,                  -- only with an import's explicit keep-notes option
    created_at       timestamptz,           -- MD.ai's createdAt / updatedAt
    updated_at       timestamptz,
    stored_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX annotation_by_study ON annotation (study_uid);
CREATE INDEX annotation_by_series ON annotation (series_uid);
CREATE INDEX annotation_by_label ON annotation (label_id);
CREATE INDEX annotation_by_reader ON annotation (reader);
