-- 0001: the broker's first schema.
CREATE TABLE users (
  name        TEXT PRIMARY KEY,
  role        TEXT NOT NULL,
  handle      BLOB NOT NULL UNIQUE,
  disabled    INTEGER NOT NULL DEFAULT 0,
  created_at  INTEGER NOT NULL
);
CREATE TABLE credentials (
  id          BLOB PRIMARY KEY,
  user_name   TEXT NOT NULL REFERENCES users(name),
  data        BLOB NOT NULL,
  created_at  INTEGER NOT NULL
);
CREATE INDEX credentials_user ON credentials(user_name);
CREATE TABLE tokens (
  hash        TEXT PRIMARY KEY,
  kind        TEXT NOT NULL,
  user_name   TEXT NOT NULL DEFAULT '',
  device      TEXT NOT NULL DEFAULT '',
  request     TEXT NOT NULL DEFAULT '',
  created_at  INTEGER NOT NULL,
  expires_at  INTEGER NOT NULL,
  used_at     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE ceremonies (
  id          TEXT PRIMARY KEY,
  data        BLOB NOT NULL,
  view_hash   TEXT NOT NULL DEFAULT '',
  expires_at  INTEGER NOT NULL
);
CREATE TABLE devices (
  id           TEXT PRIMARY KEY,
  user_name    TEXT NOT NULL,
  hostname     TEXT NOT NULL,
  public_key   BLOB NOT NULL UNIQUE,
  state        TEXT NOT NULL,
  created_at   INTEGER NOT NULL,
  confirmed_at INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE nonces (
  device      TEXT NOT NULL,
  nonce       TEXT NOT NULL,
  expires_at  INTEGER NOT NULL,
  PRIMARY KEY (device, nonce)
);
CREATE TABLE posture (
  device       TEXT PRIMARY KEY,
  collected_at INTEGER NOT NULL,
  received_at  INTEGER NOT NULL,
  report       BLOB NOT NULL,
  signature    BLOB NOT NULL
);
CREATE TABLE requests (
  id          TEXT PRIMARY KEY,
  device      TEXT NOT NULL,
  requester   TEXT NOT NULL,
  state       TEXT NOT NULL,
  data        BLOB NOT NULL
);
CREATE INDEX requests_state ON requests(state);
CREATE INDEX requests_device ON requests(device, state);
CREATE TABLE activations (
  request      TEXT PRIMARY KEY,
  device       TEXT NOT NULL,
  tunnel_addr  TEXT NOT NULL,
  wg_public    TEXT NOT NULL,
  destination  TEXT NOT NULL,
  cert_serial  INTEGER NOT NULL,
  created_at   INTEGER NOT NULL,
  ended        INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX activations_live_addr ON activations(tunnel_addr) WHERE ended = 0;
CREATE TABLE device_events (
  seq         INTEGER PRIMARY KEY AUTOINCREMENT,
  device      TEXT NOT NULL,
  data        BLOB NOT NULL
);
CREATE INDEX device_events_device ON device_events(device, seq);
CREATE TABLE audit_events (
  seq         INTEGER PRIMARY KEY,
  hash        TEXT NOT NULL,
  data        BLOB NOT NULL
);
CREATE TABLE recordings (
  id          TEXT PRIMARY KEY,
  started     INTEGER NOT NULL,
  data        BLOB NOT NULL
);
