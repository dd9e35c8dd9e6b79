-- Query engine for all levels: patient aggregates, typed study time, and the series and
-- patient-characteristic columns QIDO-RS and C-FIND match on.

ALTER TABLE patient
    ADD COLUMN num_studies   integer NOT NULL DEFAULT 0,
    ADD COLUMN num_series    integer NOT NULL DEFAULT 0,
    ADD COLUMN num_instances integer NOT NULL DEFAULT 0;
UPDATE patient p SET
    num_studies = (SELECT count(*) FROM study st WHERE st.patient_pk = p.pk),
    num_series = (SELECT coalesce(sum(st.num_series), 0) FROM study st WHERE st.patient_pk = p.pk),
    num_instances = (SELECT coalesce(sum(st.num_instances), 0) FROM study st
                     WHERE st.patient_pk = p.pk);
CREATE INDEX patient_by_pseudonym_pattern ON patient (upper(pseudonym) text_pattern_ops);
CREATE INDEX patient_by_site ON patient (site_id);

-- PatientID and PatientName both hold the pseudonym: matched on patient.pseudonym.
DROP INDEX study_by_patient_id;
DROP INDEX study_by_patient_id_pattern;
ALTER TABLE study DROP COLUMN patient_id;

ALTER TABLE study ALTER COLUMN study_time TYPE time USING (
    CASE WHEN study_time ~ '^[0-9]{6}'
         THEN (substr(study_time, 1, 2) || ':' || substr(study_time, 3, 2) || ':'
               || substr(study_time, 5, 2))::time
    END);
ALTER TABLE study
    ADD COLUMN patient_sex text,
    ADD COLUMN patient_age text;
UPDATE study SET
    patient_sex = convert_from(dicom_json, 'UTF8')::jsonb -> '00100040' -> 'Value' ->> 0,
    patient_age = convert_from(dicom_json, 'UTF8')::jsonb -> '00101010' -> 'Value' ->> 0;
CREATE INDEX study_by_study_id ON study (study_id);
CREATE INDEX study_by_date_time ON study ((study_date + coalesce(study_time, '00:00')));

ALTER TABLE series
    ADD COLUMN pps_start_date date,
    ADD COLUMN pps_start_time time;
CREATE INDEX series_by_modality ON series (modality);
CREATE INDEX instance_by_sop_class ON instance (sop_class_uid);
