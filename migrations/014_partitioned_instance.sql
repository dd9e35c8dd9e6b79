-- Instances partitioned by study (issue #18), so the archive stays fast at 10^9 instances.
-- `instance` is hash-partitioned on study_pk into N partitions instance_p000, instance_p001, ...
-- N is the session setting ricord.instance_partitions when set (the archive sets it from
-- [server] instance_partitions), else 128: at 10^9 instances about 8 million rows and 16-20 GB
-- per partition (bench/RESULTS.md, "Towards 10^9 instances"). Readers resolve the study's pk
-- first and pass it as a parameter, so PostgreSQL plans and locks only that partition.
-- A unique index on a partitioned table must hold the partition key, so SOP Instance UIDs are
-- kept globally unique by `instance_uid` (not partitioned), which also answers "which study
-- holds this instance" without touching every partition. blob_key loses its UNIQUE: blob keys
-- are fresh uuid4 names or segment slots handed out once, unique by construction.
-- instance_by_study is covered by the primary key (study_pk, pk); instance_by_sop_class goes:
-- instance queries are always narrowed to a few studies. An existing archive is converted in
-- place: every row keeps its pk and instance_pk_seq continues.

ALTER TABLE cohort_instance DROP CONSTRAINT cohort_instance_instance_pk_fkey;
ALTER SEQUENCE instance_pk_seq OWNED BY NONE;
ALTER TABLE instance RENAME TO instance_unpartitioned;

CREATE TABLE instance (
    pk               bigint NOT NULL DEFAULT nextval('instance_pk_seq'),
    series_pk        bigint NOT NULL,
    study_pk         bigint NOT NULL,
    sop_uid          text NOT NULL,
    sop_class_uid    text NOT NULL,
    instance_number  integer,
    transfer_syntax_uid text NOT NULL,
    blob_key         text NOT NULL,    -- unique by construction (uuid4 names, segment slots)
    size_bytes       bigint NOT NULL,
    sha256           bytea NOT NULL,
    dicom_json       bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    pixel_data_offset bigint,
    pixel_data_length bigint,
    number_of_frames integer NOT NULL DEFAULT 1,
    rows             integer,
    columns          integer,
    samples_per_pixel integer,
    bits_allocated   integer
) PARTITION BY HASH (study_pk);

DO $$
DECLARE
    v_setting text := current_setting('ricord.instance_partitions', true);
    v_count integer := 128;
BEGIN
    IF coalesce(v_setting, '') <> '' THEN
        IF v_setting !~ '^[0-9]{1,4}$' OR v_setting::integer NOT BETWEEN 1 AND 1024 THEN
            RAISE EXCEPTION 'ricord.instance_partitions must be an integer from 1 to 1024';
        END IF;
        v_count := v_setting::integer;
    END IF;
    FOR i IN 0 .. v_count - 1 LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF instance '
                       'FOR VALUES WITH (MODULUS %s, REMAINDER %s)',
                       'instance_p' || lpad(i::text, 3, '0'), v_count, i);
    END LOOP;
END;
$$;

INSERT INTO instance (pk, series_pk, study_pk, sop_uid, sop_class_uid, instance_number,
                      transfer_syntax_uid, blob_key, size_bytes, sha256, dicom_json, created_at,
                      pixel_data_offset, pixel_data_length, number_of_frames, rows, columns,
                      samples_per_pixel, bits_allocated)
SELECT pk, series_pk, study_pk, sop_uid, sop_class_uid, instance_number,
       transfer_syntax_uid, blob_key, size_bytes, sha256, dicom_json, created_at,
       pixel_data_offset, pixel_data_length, number_of_frames, rows, columns,
       samples_per_pixel, bits_allocated
FROM instance_unpartitioned;

-- one row per instance: SOP Instance UIDs unique across partitions, and where each one lives
CREATE TABLE instance_uid (
    sop_uid          text PRIMARY KEY,
    study_pk         bigint NOT NULL,
    instance_pk      bigint NOT NULL
);
INSERT INTO instance_uid (sop_uid, study_pk, instance_pk)
SELECT sop_uid, study_pk, pk FROM instance_unpartitioned;

ALTER TABLE cohort_instance ADD COLUMN study_pk bigint;
UPDATE cohort_instance c SET study_pk = i.study_pk
FROM instance_unpartitioned i WHERE i.pk = c.instance_pk;
ALTER TABLE cohort_instance ALTER COLUMN study_pk SET NOT NULL;

DROP TABLE instance_unpartitioned;
ALTER SEQUENCE instance_pk_seq OWNED BY instance.pk;

ALTER TABLE instance
    ADD CONSTRAINT instance_pkey PRIMARY KEY (study_pk, pk),
    ADD CONSTRAINT instance_series_pk_fkey FOREIGN KEY (series_pk) REFERENCES series (pk),
    ADD CONSTRAINT instance_study_pk_fkey FOREIGN KEY (study_pk) REFERENCES study (pk);
CREATE INDEX instance_by_series ON instance (series_pk, instance_number);
CREATE INDEX instance_by_sop_uid ON instance (sop_uid);
ALTER TABLE cohort_instance ADD CONSTRAINT cohort_instance_instance_fkey
    FOREIGN KEY (study_pk, instance_pk) REFERENCES instance (study_pk, pk);

-- Same arguments, results and outcomes as in migrations/009. The SOP Instance UID is looked up
-- in instance_uid, the instance then read by (study_pk, pk): one partition. A new instance
-- claims its UID in instance_uid first (a concurrent writer of the same UID waits on that
-- unique index, then finds the instance as a duplicate), then inserts the instance row.
-- Lock order: study when new, series when new, instance_uid, instance, study when its
-- modalities grow, tally row.
CREATE OR REPLACE FUNCTION store_instance(
    p_patient_pk bigint, p_site_id integer,
    p_study_uid text, p_study_date date, p_study_time time, p_accession text, p_study_id text,
    p_patient_sex text, p_patient_age text, p_study_json bytea,
    p_series_uid text, p_modality text, p_series_number integer, p_pps_date date,
    p_pps_time time, p_series_json bytea,
    p_sop_uid text, p_sop_class_uid text, p_instance_number integer, p_transfer_syntax text,
    p_blob_key text, p_size bigint, p_sha256 bytea, p_instance_json bytea,
    p_pixel_offset bigint, p_pixel_length bigint, p_frames integer, p_rows integer,
    p_columns integer, p_samples integer, p_bits integer, p_on_conflict text
) RETURNS TABLE (outcome text, stored_sha256 bytea, replaced_blob_key text)
LANGUAGE plpgsql AS $$
DECLARE
    v_uid record;
    v_existing record;
    v_study record;
    v_series record;
    v_instance_pk bigint;
BEGIN
    FOR attempt IN 1..2 LOOP
        SELECT u.study_pk, u.instance_pk INTO v_uid FROM instance_uid u
        WHERE u.sop_uid = p_sop_uid;
        IF FOUND THEN
            SELECT i.pk, i.sha256, i.blob_key, se.series_uid, st.study_uid INTO v_existing
            FROM instance i JOIN series se ON se.pk = i.series_pk
                 JOIN study st ON st.pk = i.study_pk
            WHERE i.study_pk = v_uid.study_pk AND i.pk = v_uid.instance_pk;
            IF v_existing.study_uid <> p_study_uid OR v_existing.series_uid <> p_series_uid THEN
                RAISE EXCEPTION 'SOP Instance UID already stored under another study or series'
                    USING ERRCODE = 'RI001';
            END IF;
            IF v_existing.sha256 = p_sha256 OR p_on_conflict <> 'overwrite' THEN
                RETURN QUERY SELECT 'duplicate'::text, v_existing.sha256, NULL::text;
                RETURN;
            END IF;
            UPDATE instance SET sop_class_uid = p_sop_class_uid,
                instance_number = p_instance_number, transfer_syntax_uid = p_transfer_syntax,
                blob_key = p_blob_key, size_bytes = p_size, sha256 = p_sha256,
                dicom_json = p_instance_json, pixel_data_offset = p_pixel_offset,
                pixel_data_length = p_pixel_length, number_of_frames = p_frames, rows = p_rows,
                columns = p_columns, samples_per_pixel = p_samples, bits_allocated = p_bits
            WHERE study_pk = v_uid.study_pk AND pk = v_uid.instance_pk;
            RETURN QUERY SELECT 'replaced'::text, v_existing.sha256, v_existing.blob_key;
            RETURN;
        END IF;
        EXIT WHEN attempt = 2;

        SELECT pk, patient_pk, modalities INTO v_study FROM study WHERE study_uid = p_study_uid;
        IF NOT FOUND THEN
            INSERT INTO study (patient_pk, site_id, study_uid, study_date, study_time,
                               accession_number, study_id, patient_sex, patient_age, modalities,
                               dicom_json)
            VALUES (p_patient_pk, p_site_id, p_study_uid, p_study_date, p_study_time,
                    p_accession, p_study_id, p_patient_sex, p_patient_age,
                    CASE WHEN p_modality IS NULL THEN '{}' ELSE ARRAY[p_modality] END,
                    p_study_json)
            ON CONFLICT (study_uid) DO NOTHING
            RETURNING pk, patient_pk, modalities INTO v_study;
            IF NOT FOUND THEN  -- a concurrent transaction inserted it and has committed
                SELECT pk, patient_pk, modalities INTO v_study
                FROM study WHERE study_uid = p_study_uid;
                IF NOT FOUND THEN  -- not in this snapshot (REPEATABLE READ): run again
                    RAISE EXCEPTION 'study inserted concurrently'
                        USING ERRCODE = 'serialization_failure';
                END IF;
            END IF;
        END IF;
        IF v_study.patient_pk <> p_patient_pk THEN
            RAISE EXCEPTION 'Study Instance UID already stored under another patient'
                USING ERRCODE = 'RI001';
        END IF;

        SELECT pk, study_pk INTO v_series FROM series WHERE series_uid = p_series_uid;
        IF NOT FOUND THEN
            INSERT INTO series (study_pk, series_uid, modality, series_number, pps_start_date,
                                pps_start_time, dicom_json)
            VALUES (v_study.pk, p_series_uid, p_modality, p_series_number, p_pps_date,
                    p_pps_time, p_series_json)
            ON CONFLICT (series_uid) DO NOTHING
            RETURNING pk, study_pk INTO v_series;
            IF NOT FOUND THEN
                SELECT pk, study_pk INTO v_series FROM series WHERE series_uid = p_series_uid;
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'series inserted concurrently'
                        USING ERRCODE = 'serialization_failure';
                END IF;
            END IF;
        END IF;
        IF v_series.study_pk <> v_study.pk THEN
            RAISE EXCEPTION 'Series Instance UID already stored under another study'
                USING ERRCODE = 'RI001';
        END IF;

        v_instance_pk := nextval('instance_pk_seq');
        INSERT INTO instance_uid (sop_uid, study_pk, instance_pk)
        VALUES (p_sop_uid, v_study.pk, v_instance_pk)
        ON CONFLICT (sop_uid) DO NOTHING;
        IF FOUND THEN
            INSERT INTO instance (pk, series_pk, study_pk, sop_uid, sop_class_uid,
                                  instance_number, transfer_syntax_uid, blob_key, size_bytes,
                                  sha256, dicom_json, pixel_data_offset, pixel_data_length,
                                  number_of_frames, rows, columns, samples_per_pixel,
                                  bits_allocated)
            VALUES (v_instance_pk, v_series.pk, v_study.pk, p_sop_uid, p_sop_class_uid,
                    p_instance_number, p_transfer_syntax, p_blob_key, p_size, p_sha256,
                    p_instance_json, p_pixel_offset, p_pixel_length, p_frames, p_rows,
                    p_columns, p_samples, p_bits);
            IF p_modality IS NOT NULL AND NOT p_modality = ANY (v_study.modalities) THEN
                -- rechecked on the row as it is once a concurrent writer of the study committed
                UPDATE study SET modalities = array_append(modalities, p_modality),
                    updated_at = now()
                WHERE pk = v_study.pk AND NOT p_modality = ANY (modalities);
            END IF;
            INSERT INTO instance_tally AS t (series_pk, slot, study_pk, patient_pk, instances)
            VALUES (v_series.pk, pg_backend_pid() % 64, v_study.pk, p_patient_pk, 1)
            ON CONFLICT (series_pk, slot) DO UPDATE SET instances = t.instances + 1;
            RETURN QUERY SELECT 'inserted'::text, p_sha256, NULL::text;
            RETURN;
        END IF;
        -- a concurrent writer stored the same instance first: report it as a duplicate
    END LOOP;
    RAISE EXCEPTION 'instance inserted concurrently' USING ERRCODE = 'serialization_failure';
END;
$$;
