-- The audit trail: one PHI-free row per DIMSE association opened or closed, stored object,
-- query, retrieval and refused access, in the vocabulary of PS3.15 A.5 (DCM codes for the
-- EventID and EventTypeCode, EventActionCode C/R/U/D/E, EventOutcomeIndicator 0/4/8/12).
-- Objects are named by their de-identified UIDs only.
--
-- Append-only: rows are never updated; DELETE (retention) is refused unless the transaction
-- says so with SET LOCAL ricord.audit_retention = 'on'; TRUNCATE is refused.

CREATE TABLE audit_event (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL,
    event_id     text NOT NULL,          -- DCM code, e.g. 110104 DICOM Instances Transferred
    event_type   text,                   -- DCM code, e.g. 110124 Attach
    action       char(1) NOT NULL CHECK (action IN ('C', 'R', 'U', 'D', 'E')),
    outcome      smallint NOT NULL CHECK (outcome IN (0, 4, 8, 12)),
    who          text,                   -- a token's name or a calling AE title
    role         text NOT NULL,
    site         text,
    source       text,                   -- the peer's address
    protocol     text NOT NULL,
    resource     text,                   -- a route template, a query level, "association"
    study_uid    text,
    series_uid   text,
    sop_uid      text,
    detail       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_event_by_time ON audit_event (at);

CREATE FUNCTION audit_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('ricord.audit_retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_event is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_event_no_update BEFORE UPDATE OR DELETE ON audit_event
    FOR EACH ROW EXECUTE FUNCTION audit_event_append_only();
CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event
    FOR EACH STATEMENT EXECUTE FUNCTION audit_event_append_only();
