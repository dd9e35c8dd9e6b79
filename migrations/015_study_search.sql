-- Study-level searches that do not scan (issue #18, part B).
--
-- ModalitiesInStudy is answered from study_modality, one row per (modality, study): a single
-- modality's studies come straight from its primary key in study order, so a page and the bounded
-- count cost what they return, not a walk of every study. study.modalities stays (answers return
-- it); a trigger on study keeps study_modality current, so the store function needs no change.
-- A study's modalities only ever grow (the store appends), so the trigger only inserts.
-- A site's studies and patients come from (site_id, pk) indexes in key order for the same reason.

CREATE TABLE study_modality (
    modality  text NOT NULL,
    study_pk  bigint NOT NULL REFERENCES study (pk),
    PRIMARY KEY (modality, study_pk)
);

INSERT INTO study_modality (modality, study_pk)
SELECT DISTINCT m, st.pk FROM study st, unnest(st.modalities) AS m
ON CONFLICT DO NOTHING;

CREATE FUNCTION study_modality_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO study_modality (modality, study_pk)
    SELECT DISTINCT m, NEW.pk FROM unnest(NEW.modalities) AS m
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER study_modality_sync AFTER INSERT OR UPDATE OF modalities ON study
    FOR EACH ROW EXECUTE FUNCTION study_modality_sync();

-- Nothing reads the array through its GIN index any more.
DROP INDEX study_by_modalities;

DROP INDEX study_by_site;
CREATE INDEX study_by_site ON study (site_id, pk);
DROP INDEX patient_by_site;
CREATE INDEX patient_by_site ON patient (site_id, pk);
