-- Patient identity by issuer: a patient is filed under the keyed hash of (site,
-- IssuerOfPatientID, PatientID) when the object names an issuer (or the site has a
-- default_issuer), else under the keyed hash of (site, PatientID) as before.
-- patient_key: the issuer-less hash. Every patient allocated before this migration has it, and so
-- has the first patient of a PatientID allocated with an issuer; NULL for a second issuer's patient
-- of the same PatientID. issuer_key: the issuer hash, recorded when such a patient is allocated or
-- when the first issuer that arrives claims a patient that had only patient_key.
-- Neither holds an original value.
ALTER TABLE patient ADD COLUMN issuer_key bytea;
ALTER TABLE patient ALTER COLUMN patient_key DROP NOT NULL;
ALTER TABLE patient ADD CONSTRAINT patient_site_issuer_key_unique UNIQUE (site_id, issuer_key);
ALTER TABLE patient ADD CONSTRAINT patient_has_a_key
    CHECK (patient_key IS NOT NULL OR issuer_key IS NOT NULL);
