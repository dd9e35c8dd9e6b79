-- Where each instance's pixel data starts in its blob, and the frame geometry, so frames are
-- read from the stored bytes without parsing or decoding the whole object.

ALTER TABLE instance
    ADD COLUMN pixel_data_offset bigint,       -- first byte of the Pixel Data value
    ADD COLUMN pixel_data_length bigint,       -- NULL: encapsulated (undefined length)
    ADD COLUMN number_of_frames integer NOT NULL DEFAULT 1,
    ADD COLUMN rows integer,
    ADD COLUMN columns integer,
    ADD COLUMN samples_per_pixel integer,
    ADD COLUMN bits_allocated integer;
