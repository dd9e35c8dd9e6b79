-- The archive's index: sites, pseudonymous patients, studies, series, instances.
-- No original identifier is stored: a patient is known by a keyed hash (HMAC) of its PatientID.

CREATE TABLE site (
    id               serial PRIMARY KEY,
    name             text NOT NULL UNIQUE,
    siteid           text NOT NULL UNIQUE CHECK (siteid ~ '^[1-9][0-9]{5}$'),
    next_patient_number integer NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE patient (
    pk               bigserial PRIMARY KEY,
    site_id          integer NOT NULL REFERENCES site (id),
    patient_key      bytea NOT NULL,
    pseudonym        text NOT NULL UNIQUE,
    date_offset_days integer NOT NULL CHECK (date_offset_days < 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT patient_site_key_unique UNIQUE (site_id, patient_key)
);

CREATE TABLE study (
    pk               bigserial PRIMARY KEY,
    patient_pk       bigint NOT NULL REFERENCES patient (pk),
    site_id          integer NOT NULL REFERENCES site (id),
    study_uid        text NOT NULL UNIQUE,
    patient_id       text NOT NULL,
    study_date       date,
    study_time       text,
    accession_number text,
    study_id         text,
    modalities       text[] NOT NULL DEFAULT '{}',
    num_series       integer NOT NULL DEFAULT 0,
    num_instances    integer NOT NULL DEFAULT 0,
    dicom_json       bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX study_by_patient_id ON study (patient_id);
CREATE INDEX study_by_patient_id_pattern ON study (patient_id text_pattern_ops);
CREATE INDEX study_by_date ON study (study_date);
CREATE INDEX study_by_accession ON study (accession_number);
CREATE INDEX study_by_modalities ON study USING gin (modalities);
CREATE INDEX study_by_site ON study (site_id);
CREATE INDEX study_by_patient ON study (patient_pk);

CREATE TABLE series (
    pk               bigserial PRIMARY KEY,
    study_pk         bigint NOT NULL REFERENCES study (pk),
    series_uid       text NOT NULL UNIQUE,
    modality         text,
    series_number    integer,
    num_instances    integer NOT NULL DEFAULT 0,
    dicom_json       bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_by_study ON series (study_pk);

CREATE TABLE instance (
    pk               bigserial PRIMARY KEY,
    series_pk        bigint NOT NULL REFERENCES series (pk),
    study_pk         bigint NOT NULL REFERENCES study (pk),
    sop_uid          text NOT NULL UNIQUE,
    sop_class_uid    text NOT NULL,
    instance_number  integer,
    transfer_syntax_uid text NOT NULL,
    blob_key         text NOT NULL UNIQUE,
    size_bytes       bigint NOT NULL,
    sha256           bytea NOT NULL,
    dicom_json       bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instance_by_series ON instance (series_pk, instance_number);
CREATE INDEX instance_by_study ON instance (study_pk);
