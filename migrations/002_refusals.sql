-- Objects refused by policy, counted per site and reason (a fixed label, never PHI).

CREATE TABLE refusal (
    site_id  integer NOT NULL REFERENCES site (id),
    reason   text NOT NULL,
    count    bigint NOT NULL DEFAULT 1,
    first_at timestamptz NOT NULL DEFAULT now(),
    last_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, reason)
);
