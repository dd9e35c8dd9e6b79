-- Cohorts (issue #14): a named, frozen selection of series a researcher downloads as a whole.
-- Freezing keeps the instances the matching series held then (later arrivals, even into the
-- same series, change nothing), with what an exact, resumable download needs up front: each
-- object's blob key, size, SHA-256 and CRC-32 (the ZIP's), and the metadata.csv and
-- clinical.csv the archive holds, as they were.

CREATE TABLE cohort (
    id               bigserial PRIMARY KEY,
    name             text NOT NULL,
    description      text NOT NULL DEFAULT '',
    license          text NOT NULL DEFAULT '',
    citation         text NOT NULL DEFAULT '',
    filters          jsonb NOT NULL DEFAULT '{}',
    site_id          integer REFERENCES site (id),  -- an uploader's site; NULL: every site
    created_by       text,                          -- a token's name (never a token)
    num_studies      integer NOT NULL,
    num_series       integer NOT NULL,
    num_instances    integer NOT NULL,
    size_bytes       bigint NOT NULL,
    metadata_csv     bytea NOT NULL,
    clinical_csv     bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE cohort_series (
    cohort_id        bigint NOT NULL REFERENCES cohort (id) ON DELETE CASCADE,
    position         integer NOT NULL,
    series_pk        bigint NOT NULL REFERENCES series (pk),
    PRIMARY KEY (cohort_id, position)
);

CREATE TABLE cohort_instance (
    cohort_id        bigint NOT NULL REFERENCES cohort (id) ON DELETE CASCADE,
    position         integer NOT NULL,               -- order in the archive (ZIP entries)
    instance_pk      bigint NOT NULL REFERENCES instance (pk),
    blob_key         text NOT NULL,
    size_bytes       bigint NOT NULL,
    sha256           bytea NOT NULL,
    crc32            bigint NOT NULL CHECK (crc32 BETWEEN 0 AND 4294967295),
    PRIMARY KEY (cohort_id, position)
);
-- a blob's CRC-32 is computed once: a later cohort holding the same blob reuses it
CREATE INDEX cohort_instance_by_blob ON cohort_instance (blob_key);
