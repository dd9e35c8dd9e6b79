-- A lighter instance transaction (issue #13). The counters QIDO-RS and C-FIND answer
-- (NumberOfStudyRelatedInstances and the like) leave the patient, study and series rows, which
-- every stored instance rewrote (the study row twice) under row locks that made concurrent
-- senders of one study wait for each other's commit. They are summed at query time from
-- `instance_tally`: per series, one row per writing session slot (the backend's pid modulo 64),
-- so concurrent sessions add to their own rows and do not wait for each other. A stored
-- instance now writes its instance row and one tally row version; the study row only changes
-- when ModalitiesInStudy gains a modality, the series and study rows are written once, when
-- created. Counts stay exact: the tally row commits with the instance.

CREATE TABLE instance_tally (
    series_pk   bigint NOT NULL REFERENCES series (pk),
    slot        smallint NOT NULL,
    study_pk    bigint NOT NULL,   -- the series' study and patient, to sum a study or patient
    patient_pk  bigint NOT NULL,
    instances   integer NOT NULL,
    PRIMARY KEY (series_pk, slot)
) WITH (fillfactor = 50);          -- room on the page: a count update stays a HOT update
CREATE INDEX instance_tally_by_study ON instance_tally (study_pk);
CREATE INDEX instance_tally_by_patient ON instance_tally (patient_pk);

INSERT INTO instance_tally (series_pk, slot, study_pk, patient_pk, instances)
SELECT i.series_pk, 0, i.study_pk, st.patient_pk, count(*)
FROM instance i JOIN study st ON st.pk = i.study_pk
GROUP BY i.series_pk, i.study_pk, st.patient_pk;

ALTER TABLE patient DROP COLUMN num_studies, DROP COLUMN num_series, DROP COLUMN num_instances;
ALTER TABLE study DROP COLUMN num_series, DROP COLUMN num_instances;
ALTER TABLE series DROP COLUMN num_instances;

-- Same arguments, results and outcomes as in migrations/007. Study and series are looked up
-- first and inserted only when missing (a concurrent insert of the same one waits for the
-- other transaction, then finds its row). Locks are taken in one order -- study when new,
-- series when new, instance, study when its modalities grow, tally row -- each step waiting
-- only for a transaction that is past that step, so concurrent writers queue, never deadlock.
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
    v_existing record;
    v_study record;
    v_series record;
    v_instance_pk bigint;
BEGIN
    FOR attempt IN 1..2 LOOP
        SELECT i.pk, i.sha256, i.blob_key, se.series_uid, st.study_uid INTO v_existing
        FROM instance i JOIN series se ON se.pk = i.series_pk JOIN study st ON st.pk = i.study_pk
        WHERE i.sop_uid = p_sop_uid;
        IF FOUND THEN
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
            WHERE pk = v_existing.pk;
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

        INSERT INTO instance (series_pk, study_pk, sop_uid, sop_class_uid, instance_number,
                              transfer_syntax_uid, blob_key, size_bytes, sha256, dicom_json,
                              pixel_data_offset, pixel_data_length, number_of_frames, rows,
                              columns, samples_per_pixel, bits_allocated)
        VALUES (v_series.pk, v_study.pk, p_sop_uid, p_sop_class_uid, p_instance_number,
                p_transfer_syntax, p_blob_key, p_size, p_sha256, p_instance_json,
                p_pixel_offset, p_pixel_length, p_frames, p_rows, p_columns, p_samples, p_bits)
        ON CONFLICT (sop_uid) DO NOTHING
        RETURNING pk INTO v_instance_pk;
        IF v_instance_pk IS NOT NULL THEN
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
