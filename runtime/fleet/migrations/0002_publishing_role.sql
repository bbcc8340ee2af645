-- The publishing role (signing and publishing desired states, deployments, rollouts, rules):
-- one replica at a time holds it, by a session advisory lock that PostgreSQL lets go of when
-- that replica's connection ends (a `kill -9` included). Each new holder bumps `epoch`; every
-- desired-state and rollout write checks, under a share lock on this row, that the epoch is
-- still its own, so a replica that lost the role can no longer write what it would publish.
CREATE TABLE leadership (
    id integer PRIMARY KEY CHECK (id = 1),
    epoch bigint NOT NULL,
    holder text,
    since bigint NOT NULL
);
INSERT INTO leadership (id, epoch, holder, since) VALUES (1, 0, NULL, 0);
