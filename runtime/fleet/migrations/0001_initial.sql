-- Outpost fleet state, version 1. Applied once, at start, by the first replica that finds it
-- missing (under an advisory lock, so replicas starting together do not race).
--
-- Documents are the API's JSON records (jsonb, so an operator can query them); ids are text
-- in the "C" collation, so the device list's order is the same bytewise order as sled's.

CREATE TABLE meta (
    key text COLLATE "C" PRIMARY KEY,
    value bytea NOT NULL
);

CREATE TABLE devices (
    id text COLLATE "C" PRIMARY KEY,
    doc jsonb NOT NULL
);

CREATE TABLE credentials (
    device text COLLATE "C" PRIMARY KEY,
    doc jsonb NOT NULL
);

-- The bundle index; the bundle files are content-addressed files beside it (see the fleet's
-- `--data-dir`), named by this digest.
CREATE TABLE bundles (
    name text COLLATE "C" NOT NULL,
    version text COLLATE "C" NOT NULL,
    digest text NOT NULL,
    doc jsonb NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX bundles_by_digest ON bundles (digest);

CREATE TABLE desired (
    device text COLLATE "C" PRIMARY KEY,
    generation bigint NOT NULL,
    doc jsonb NOT NULL
);

CREATE TABLE deployments (id bigint PRIMARY KEY, doc jsonb NOT NULL);
CREATE TABLE rollouts (id bigint PRIMARY KEY, doc jsonb NOT NULL);
CREATE TABLE firings (id bigint PRIMARY KEY, doc jsonb NOT NULL);

-- Deployment, rollout and firing ids, one sequence as in the embedded store.
CREATE SEQUENCE ids;

-- Telemetry and events. The key table holds exactly one row per (device, seq, variant): its
-- primary key is what makes storage exactly-once when a record is delivered twice, to one
-- replica or two. The records themselves live in tables partitioned by the UTC day the fleet
-- received them, so retention drops whole partitions instead of deleting rows.
CREATE TABLE telemetry_keys (
    device text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    variant smallint NOT NULL,
    sha256 bytea NOT NULL,
    size integer NOT NULL,
    received bigint NOT NULL,
    PRIMARY KEY (device, seq, variant)
);
CREATE INDEX telemetry_keys_by_received ON telemetry_keys (received);

CREATE TABLE telemetry (
    device text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    variant smallint NOT NULL,
    time bigint NOT NULL,
    received bigint NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (device, seq, variant, received)
) PARTITION BY RANGE (received);
-- Only rows the day partitions were not ready for (none in normal running).
CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT;

CREATE TABLE events_keys (
    device text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    variant smallint NOT NULL,
    sha256 bytea NOT NULL,
    size integer NOT NULL,
    received bigint NOT NULL,
    PRIMARY KEY (device, seq, variant)
);
CREATE INDEX events_keys_by_received ON events_keys (received);

CREATE TABLE events (
    device text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    variant smallint NOT NULL,
    time bigint NOT NULL,
    received bigint NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (device, seq, variant, received)
) PARTITION BY RANGE (received);
CREATE TABLE events_default PARTITION OF events DEFAULT;
