-- The duplicate policy inside the store function: a re-sent SOP Instance UID with other
-- content is kept as first stored ('duplicate', the caller warns or refuses) or, with
-- p_on_conflict = 'overwrite', replaces the row; the old blob key is returned so the caller
-- deletes that file only after the commit.

DROP FUNCTION store_instance(
    bigint, integer, text, date, time, text, text, text, text, bytea, text, text, integer, date,
    time, bytea, text, text, integer, text, text, bigint, bytea, bytea, bigint, bigint, integer,
    integer, integer, integer, integer);

CREATE FUNCTION store_instance(
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

        INSERT INTO study (patient_pk, site_id, study_uid, study_date, study_time,
                           accession_number, study_id, patient_sex, patient_age, dicom_json)
        VALUES (p_patient_pk, p_site_id, p_study_uid, p_study_date, p_study_time, p_accession,
                p_study_id, p_patient_sex, p_patient_age, p_study_json)
        ON CONFLICT (study_uid) DO UPDATE SET updated_at = now()
        RETURNING pk, patient_pk, (xmax = 0) AS created INTO v_study;
        IF v_study.patient_pk <> p_patient_pk THEN
            RAISE EXCEPTION 'Study Instance UID already stored under another patient'
                USING ERRCODE = 'RI001';
        END IF;

        INSERT INTO series (study_pk, series_uid, modality, series_number, pps_start_date,
                            pps_start_time, dicom_json)
        VALUES (v_study.pk, p_series_uid, p_modality, p_series_number, p_pps_date, p_pps_time,
                p_series_json)
        ON CONFLICT (series_uid) DO UPDATE SET modality = series.modality
        RETURNING pk, study_pk, (xmax = 0) AS created INTO v_series;
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
            UPDATE series SET num_instances = num_instances + 1 WHERE pk = v_series.pk;
            UPDATE study SET num_instances = num_instances + 1,
                num_series = num_series + v_series.created::int,
                modalities = CASE WHEN p_modality IS NULL OR p_modality = ANY (modalities)
                                  THEN modalities ELSE array_append(modalities, p_modality) END,
                updated_at = now()
            WHERE pk = v_study.pk;
            UPDATE patient SET num_instances = num_instances + 1,
                num_series = num_series + v_series.created::int,
                num_studies = num_studies + v_study.created::int
            WHERE pk = p_patient_pk;
            RETURN QUERY SELECT 'inserted'::text, p_sha256, NULL::text;
            RETURN;
        END IF;
        -- a concurrent writer stored the same instance first: report it as a duplicate
    END LOOP;
END;
$$;
