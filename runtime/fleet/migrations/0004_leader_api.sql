-- Where the holder of the publishing role answers its API (`fleet serve --advertise-url`):
-- the other replicas forward the writes they receive (push, deploy, rollouts, enrolment)
-- there, so that every replica answers the whole API behind one load balancer.
ALTER TABLE leadership ADD COLUMN IF NOT EXISTS api text;
