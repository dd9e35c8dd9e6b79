-- Clinical data (issue #14): one row per examination a site described in a clinical sheet.
-- Keyed exactly like the images, never by an original value: the patient is the patient row
-- ingest allocates (pseudonym and date offset; allocated by the import when the images have not
-- arrived), `study_uid` is the keyed StudyInstanceUID (Keyring.uid, as the de-identifier remaps
-- it), `accession_number` the keyed AccessionNumber (deid.rules.keyed_accession), dates are
-- shifted by the patient's offset, ages over 89 are 90.
--
-- An examination is named by its study UID when the sheet gives one, else by its accession
-- number: (site_id, study_uid) or, for rows without a study UID, (site_id, accession_number)
-- is unique, so importing a sheet again changes nothing and a corrected sheet updates the rows
-- it names (a row stored under its accession number only takes the study UID a later sheet
-- gives it: index/clinical.py). No link step: rows meet their study by a join on the site and the keyed study UID
-- (or the keyed accession number), whichever came first; the view `clinical_exam` does it.

CREATE TABLE clinical_row (
    pk               bigserial PRIMARY KEY,
    site_id          integer NOT NULL REFERENCES site (id),
    patient_pk       bigint NOT NULL REFERENCES patient (pk),
    study_uid        text,                 -- keyed StudyInstanceUID (2.25.<n>)
    accession_number text,                 -- keyed AccessionNumber (16 hex digits)
    study_date       date,                 -- shifted
    age              smallint CHECK (age BETWEEN 0 AND 90),
    sex              char(1) CHECK (sex IN ('M', 'F', 'O', 'U')),
    test_method      text CHECK (test_method IN ('PCR', 'SEROLOGY', 'CLINICAL')),
    test_result      text CHECK (test_result IN ('POSITIVE', 'NEGATIVE', 'INDETERMINATE')),
    test_date        date,                 -- shifted
    -- declared columns: {name: number | true/false | category value | 'YYYYMMDD' shifted}
    extra            jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(extra) = 'object'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (study_uid IS NOT NULL OR accession_number IS NOT NULL),
    CONSTRAINT clinical_row_study_unique UNIQUE (site_id, study_uid)
);
CREATE UNIQUE INDEX clinical_row_accession_unique ON clinical_row (site_id, accession_number)
    WHERE study_uid IS NULL;
CREATE INDEX clinical_row_by_patient ON clinical_row (patient_pk);
CREATE INDEX clinical_row_by_accession ON clinical_row (site_id, accession_number);

-- The declared (non built-in) columns of a site, from the MAP.toml of its imports: their type,
-- unit and allowed values (never a value of a sheet). A column keeps its type once declared.
CREATE TABLE clinical_column (
    site_id          integer NOT NULL REFERENCES site (id),
    name             text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('number', 'category', 'boolean', 'date')),
    unit             text,
    allowed          text[],
    PRIMARY KEY (site_id, name)
);

-- Each clinical row with the study it describes, when the study is in the archive (study_pk
-- NULL: not yet; the row meets its images when they arrive).
CREATE VIEW clinical_exam AS
SELECT c.*, s.pk AS study_pk, COALESCE(c.study_uid, s.study_uid) AS exam_study_uid,
       COALESCE(c.accession_number, s.accession_number) AS exam_accession,
       COALESCE(c.study_date, s.study_date) AS exam_study_date
FROM clinical_row c
LEFT JOIN LATERAL (
    SELECT st.pk, st.study_uid, st.accession_number, st.study_date FROM study st
    WHERE st.site_id = c.site_id
      AND (st.study_uid = c.study_uid
           OR (c.study_uid IS NULL AND st.accession_number = c.accession_number))
    ORDER BY st.pk LIMIT 1
) s ON true;
