-- A study date search whose count stays in the index (issue #18).
--
-- study_by_date becomes (study_date, pk): the count past a page of a date range reads the keys
-- of its matches from the index alone (an index-only scan, no heap page per match), and one
-- date's studies come from it in key order, as a page reads them.

DROP INDEX study_by_date;
CREATE INDEX study_by_date ON study (study_date, pk);
