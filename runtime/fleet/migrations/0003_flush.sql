-- A row per fleet process, written with a synchronous commit by `flush`: device messages are
-- stored in transactions committed without waiting for the disk, and one synchronous commit
-- after them makes all of them durable at once (the log is one sequence) before the broker
-- hears the acknowledgements.
CREATE TABLE IF NOT EXISTS outpost_flush (
    id bigint PRIMARY KEY,
    n bigint NOT NULL DEFAULT 0,
    at bigint NOT NULL
);
