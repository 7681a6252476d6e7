-- 0002: signed audit checkpoints.
CREATE TABLE audit_checkpoints (
  seq   INTEGER PRIMARY KEY,
  data  BLOB NOT NULL
);
