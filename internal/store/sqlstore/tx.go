package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/access"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

type txn struct{ tx *sql.Tx }

var _ store.Tx = (*txn)(nil)

func ts(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func tm(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func isUnique(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}

func (t *txn) exec(ctx context.Context, what, q string, args ...any) error {
	_, err := t.tx.ExecContext(ctx, q, args...)
	if isUnique(err) {
		return fmt.Errorf("%s: %w", what, store.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

func (t *txn) execOne(ctx context.Context, what, q string, args ...any) error {
	res, err := t.tx.ExecContext(ctx, q, args...)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if n != 1 {
		return fmt.Errorf("%s: %w", what, store.ErrNotFound)
	}
	return nil
}

// Users.

func (t *txn) CreateUser(ctx context.Context, u store.User) error {
	return t.exec(ctx, "creating user "+u.Name,
		`INSERT INTO users(name, role, handle, disabled, created_at) VALUES (?, ?, ?, ?, ?)`,
		u.Name, u.Role, u.WebAuthnID, u.Disabled, ts(u.CreatedAt))
}

func scanUser(row *sql.Row, what string) (store.User, error) {
	var u store.User
	var created int64
	if err := row.Scan(&u.Name, &u.Role, &u.WebAuthnID, &u.Disabled, &created); err != nil {
		return store.User{}, notFound(err, what)
	}
	u.CreatedAt = tm(created)
	return u, nil
}

func (t *txn) User(ctx context.Context, name string) (store.User, error) {
	return scanUser(t.tx.QueryRowContext(ctx, `SELECT name, role, handle, disabled, created_at FROM users WHERE name = ?`, name), "user "+name)
}

func (t *txn) UserByHandle(ctx context.Context, handle []byte) (store.User, error) {
	return scanUser(t.tx.QueryRowContext(ctx, `SELECT name, role, handle, disabled, created_at FROM users WHERE handle = ?`, handle), "user by handle")
}

func (t *txn) UsersWithRole(ctx context.Context, role string) ([]store.User, error) {
	rows, err := t.tx.QueryContext(ctx, `SELECT name, role, handle, disabled, created_at FROM users WHERE role = ? ORDER BY name`, role)
	if err != nil {
		return nil, fmt.Errorf("listing users: %w", err)
	}
	defer rows.Close()
	var out []store.User
	for rows.Next() {
		var u store.User
		var created int64
		if err := rows.Scan(&u.Name, &u.Role, &u.WebAuthnID, &u.Disabled, &created); err != nil {
			return nil, fmt.Errorf("listing users: %w", err)
		}
		u.CreatedAt = tm(created)
		out = append(out, u)
	}
	return out, rows.Err()
}

// Credentials.

func (t *txn) AddCredential(ctx context.Context, c store.Credential) error {
	return t.exec(ctx, "adding credential", `INSERT INTO credentials(id, user_name, data, created_at) VALUES (?, ?, ?, ?)`,
		c.ID, c.User, c.Data, ts(c.CreatedAt))
}

func (t *txn) UpdateCredential(ctx context.Context, c store.Credential) error {
	return t.execOne(ctx, "updating credential", `UPDATE credentials SET data = ? WHERE id = ? AND user_name = ?`, c.Data, c.ID, c.User)
}

func (t *txn) Credentials(ctx context.Context, user string) ([]store.Credential, error) {
	rows, err := t.tx.QueryContext(ctx, `SELECT id, user_name, data, created_at FROM credentials WHERE user_name = ? ORDER BY created_at`, user)
	if err != nil {
		return nil, fmt.Errorf("listing credentials: %w", err)
	}
	defer rows.Close()
	var out []store.Credential
	for rows.Next() {
		var c store.Credential
		var created int64
		if err := rows.Scan(&c.ID, &c.User, &c.Data, &created); err != nil {
			return nil, fmt.Errorf("listing credentials: %w", err)
		}
		c.CreatedAt = tm(created)
		out = append(out, c)
	}
	return out, rows.Err()
}

// Tokens and ceremonies.

func (t *txn) PutToken(ctx context.Context, k store.Token) error {
	return t.exec(ctx, "storing token", `INSERT INTO tokens(hash, kind, user_name, device, request, role, created_at, expires_at, used_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		k.Hash, k.Kind, k.User, k.Device, k.Request, k.Role, ts(k.CreatedAt), ts(k.ExpiresAt), ts(k.UsedAt))
}

func (t *txn) Token(ctx context.Context, hash string) (store.Token, error) {
	var k store.Token
	var c, e, u int64
	err := t.tx.QueryRowContext(ctx, `SELECT hash, kind, user_name, device, request, role, created_at, expires_at, used_at FROM tokens WHERE hash = ?`, hash).
		Scan(&k.Hash, &k.Kind, &k.User, &k.Device, &k.Request, &k.Role, &c, &e, &u)
	if err != nil {
		return store.Token{}, notFound(err, "link")
	}
	k.CreatedAt, k.ExpiresAt, k.UsedAt = tm(c), tm(e), tm(u)
	return k, nil
}

func (t *txn) UseToken(ctx context.Context, hash string, at time.Time) error {
	res, err := t.tx.ExecContext(ctx, `UPDATE tokens SET used_at = ? WHERE hash = ? AND used_at = 0`, ts(at), hash)
	if err != nil {
		return fmt.Errorf("using link: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 1 {
		return nil
	}
	if _, err := t.Token(ctx, hash); err != nil {
		return err
	}
	return fmt.Errorf("link already used: %w", store.ErrConflict)
}

func (t *txn) PutCeremony(ctx context.Context, c store.Ceremony) error {
	return t.exec(ctx, "storing ceremony", `INSERT OR REPLACE INTO ceremonies(id, data, view_hash, expires_at) VALUES (?, ?, ?, ?)`,
		c.ID, c.Data, c.ViewHash, ts(c.ExpiresAt))
}

func (t *txn) TakeCeremony(ctx context.Context, id string) (store.Ceremony, error) {
	var c store.Ceremony
	var e int64
	err := t.tx.QueryRowContext(ctx, `SELECT id, data, view_hash, expires_at FROM ceremonies WHERE id = ?`, id).Scan(&c.ID, &c.Data, &c.ViewHash, &e)
	if err != nil {
		return store.Ceremony{}, notFound(err, "ceremony")
	}
	c.ExpiresAt = tm(e)
	if err := t.exec(ctx, "deleting ceremony", `DELETE FROM ceremonies WHERE id = ?`, id); err != nil {
		return store.Ceremony{}, err
	}
	return c, nil
}

// Devices and posture.

func (t *txn) CreateDevice(ctx context.Context, d store.Device) error {
	return t.exec(ctx, "creating device", `INSERT INTO devices(id, user_name, hostname, public_key, state, created_at, confirmed_at) VALUES (?, ?, ?, ?, ?, ?, ?)`,
		d.ID, d.User, d.Hostname, d.PublicKey, d.State, ts(d.CreatedAt), ts(d.ConfirmedAt))
}

func (t *txn) UpdateDevice(ctx context.Context, d store.Device) error {
	return t.execOne(ctx, "updating device", `UPDATE devices SET user_name = ?, hostname = ?, state = ?, confirmed_at = ? WHERE id = ?`,
		d.User, d.Hostname, d.State, ts(d.ConfirmedAt), d.ID)
}

func scanDevice(row *sql.Row, what string) (store.Device, error) {
	var d store.Device
	var c, f int64
	if err := row.Scan(&d.ID, &d.User, &d.Hostname, &d.PublicKey, &d.State, &c, &f); err != nil {
		return store.Device{}, notFound(err, what)
	}
	d.CreatedAt, d.ConfirmedAt = tm(c), tm(f)
	return d, nil
}

const deviceCols = `id, user_name, hostname, public_key, state, created_at, confirmed_at`

func (t *txn) Device(ctx context.Context, id string) (store.Device, error) {
	return scanDevice(t.tx.QueryRowContext(ctx, `SELECT `+deviceCols+` FROM devices WHERE id = ?`, id), "device "+id)
}

func (t *txn) DeviceByKey(ctx context.Context, pub []byte) (store.Device, error) {
	return scanDevice(t.tx.QueryRowContext(ctx, `SELECT `+deviceCols+` FROM devices WHERE public_key = ?`, pub), "device")
}

func (t *txn) PutNonce(ctx context.Context, device, nonce string, expires time.Time) error {
	if err := t.exec(ctx, "storing nonce", `INSERT INTO nonces(device, nonce, expires_at) VALUES (?, ?, ?)`, device, nonce, ts(expires)); err != nil {
		return err
	}
	return t.exec(ctx, "bounding nonces", `DELETE FROM nonces WHERE device = ? AND nonce NOT IN
		(SELECT nonce FROM nonces WHERE device = ? ORDER BY expires_at DESC LIMIT ?)`, device, device, store.MaxNoncesPerDevice)
}

func (t *txn) TakeNonce(ctx context.Context, device, nonce string, now time.Time) error {
	res, err := t.tx.ExecContext(ctx, `DELETE FROM nonces WHERE device = ? AND nonce = ? AND expires_at > ?`, device, nonce, ts(now))
	if err != nil {
		return fmt.Errorf("taking nonce: %w", err)
	}
	n, _ := res.RowsAffected()
	if err := t.exec(ctx, "pruning nonces", `DELETE FROM nonces WHERE expires_at <= ?`, ts(now)); err != nil {
		return err
	}
	if n != 1 {
		return fmt.Errorf("posture nonce unknown, used or expired: %w", store.ErrNotFound)
	}
	return nil
}

func (t *txn) PutPosture(ctx context.Context, p store.Posture) error {
	return t.exec(ctx, "storing posture", `INSERT OR REPLACE INTO posture(device, collected_at, received_at, report, signature) VALUES (?, ?, ?, ?, ?)`,
		p.Device, ts(p.CollectedAt), ts(p.ReceivedAt), p.Report, p.Signature)
}

func (t *txn) Posture(ctx context.Context, device string) (store.Posture, error) {
	var p store.Posture
	var c, r int64
	err := t.tx.QueryRowContext(ctx, `SELECT device, collected_at, received_at, report, signature FROM posture WHERE device = ?`, device).
		Scan(&p.Device, &c, &r, &p.Report, &p.Signature)
	if err != nil {
		return store.Posture{}, notFound(err, "posture report")
	}
	p.CollectedAt, p.ReceivedAt = tm(c), tm(r)
	return p, nil
}

// Requests.

func (t *txn) CreateRequest(ctx context.Context, r access.Request) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encoding request: %w", err)
	}
	return t.exec(ctx, "creating request", `INSERT INTO requests(id, device, requester, state, data) VALUES (?, ?, ?, ?, ?)`,
		r.ID, r.Device, r.Requester, string(r.State), b)
}

func (t *txn) UpdateRequest(ctx context.Context, r access.Request) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encoding request: %w", err)
	}
	return t.execOne(ctx, "updating request", `UPDATE requests SET state = ?, data = ? WHERE id = ?`, string(r.State), b, r.ID)
}

func (t *txn) Request(ctx context.Context, id string) (access.Request, error) {
	var b []byte
	if err := t.tx.QueryRowContext(ctx, `SELECT data FROM requests WHERE id = ?`, id).Scan(&b); err != nil {
		return access.Request{}, notFound(err, "request "+id)
	}
	var r access.Request
	if err := json.Unmarshal(b, &r); err != nil {
		return access.Request{}, fmt.Errorf("decoding request %s: %w", id, err)
	}
	return r, nil
}

func (t *txn) requests(ctx context.Context, q string, args ...any) ([]access.Request, error) {
	rows, err := t.tx.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("listing requests: %w", err)
	}
	defer rows.Close()
	var out []access.Request
	for rows.Next() {
		var b []byte
		if err := rows.Scan(&b); err != nil {
			return nil, fmt.Errorf("listing requests: %w", err)
		}
		var r access.Request
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("decoding request: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func (t *txn) OpenRequests(ctx context.Context) ([]access.Request, error) {
	return t.requests(ctx, `SELECT data FROM requests WHERE state IN ('pending', 'granted') ORDER BY id`)
}

func (t *txn) RequestsOfDevice(ctx context.Context, device string) ([]access.Request, error) {
	return t.requests(ctx, `SELECT data FROM requests WHERE device = ? AND state IN ('pending', 'granted') ORDER BY id`, device)
}

// Activations.

func (t *txn) PutActivation(ctx context.Context, a store.Activation) error {
	return t.exec(ctx, "storing activation", `INSERT INTO activations(request, device, tunnel_addr, wg_public, destination, cert_serial, created_at, ended) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT(request) DO UPDATE SET device = excluded.device, tunnel_addr = excluded.tunnel_addr, wg_public = excluded.wg_public,
		destination = excluded.destination, cert_serial = excluded.cert_serial, created_at = excluded.created_at, ended = excluded.ended`,
		a.Request, a.Device, a.TunnelAddr.String(), a.WGPublicKey, a.Destination.String(), int64(a.CertSerial), ts(a.CreatedAt), a.Ended)
}

func (t *txn) Activation(ctx context.Context, request string) (store.Activation, error) {
	var a store.Activation
	var addr, dst string
	var serial, created int64
	err := t.tx.QueryRowContext(ctx, `SELECT request, device, tunnel_addr, wg_public, destination, cert_serial, created_at, ended FROM activations WHERE request = ?`, request).
		Scan(&a.Request, &a.Device, &addr, &a.WGPublicKey, &dst, &serial, &created, &a.Ended)
	if err != nil {
		return store.Activation{}, notFound(err, "activation of "+request)
	}
	var perr error
	if a.TunnelAddr, perr = netip.ParseAddr(addr); perr != nil {
		return store.Activation{}, fmt.Errorf("activation %s: %w", request, perr)
	}
	if a.Destination, perr = netip.ParseAddrPort(dst); perr != nil {
		return store.Activation{}, fmt.Errorf("activation %s: %w", request, perr)
	}
	a.CertSerial, a.CreatedAt = uint64(serial), tm(created)
	return a, nil
}

func (t *txn) LiveTunnelAddrs(ctx context.Context) ([]netip.Addr, error) {
	rows, err := t.tx.QueryContext(ctx, `SELECT tunnel_addr FROM activations WHERE ended = 0`)
	if err != nil {
		return nil, fmt.Errorf("listing tunnel addresses: %w", err)
	}
	defer rows.Close()
	var out []netip.Addr
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, fmt.Errorf("listing tunnel addresses: %w", err)
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("stored tunnel address %q: %w", s, err)
		}
		out = append(out, a)
	}
	return out, rows.Err()
}

// EndActivation marks a request's activation ended; a request that was never
// activated has none, and that is not an error.
func (t *txn) EndActivation(ctx context.Context, request string) error {
	return t.exec(ctx, "ending activation", `UPDATE activations SET ended = 1 WHERE request = ?`, request)
}

// Device events.

func (t *txn) AppendDeviceEvent(ctx context.Context, device string, e wire.Event) (wire.Event, error) {
	e.Seq = 0
	b, err := json.Marshal(e)
	if err != nil {
		return wire.Event{}, fmt.Errorf("encoding device event: %w", err)
	}
	res, err := t.tx.ExecContext(ctx, `INSERT INTO device_events(device, data) VALUES (?, ?)`, device, b)
	if err != nil {
		return wire.Event{}, fmt.Errorf("storing device event: %w", err)
	}
	e.Seq, err = res.LastInsertId()
	if err != nil {
		return wire.Event{}, fmt.Errorf("storing device event: %w", err)
	}
	return e, nil
}

func (t *txn) DeviceEvents(ctx context.Context, device string, after int64, limit int) ([]wire.Event, error) {
	rows, err := t.tx.QueryContext(ctx, `SELECT seq, data FROM device_events WHERE device = ? AND seq > ? ORDER BY seq LIMIT ?`, device, after, limit)
	if err != nil {
		return nil, fmt.Errorf("listing device events: %w", err)
	}
	defer rows.Close()
	var out []wire.Event
	for rows.Next() {
		var seq int64
		var b []byte
		if err := rows.Scan(&seq, &b); err != nil {
			return nil, fmt.Errorf("listing device events: %w", err)
		}
		var e wire.Event
		if err := json.Unmarshal(b, &e); err != nil {
			return nil, fmt.Errorf("decoding device event: %w", err)
		}
		e.Seq = seq
		out = append(out, e)
	}
	return out, rows.Err()
}

// Audit.

func (t *txn) AppendAudit(ctx context.Context, e audit.Event) (audit.Event, error) {
	prev := audit.GenesisHash
	var seq int64
	err := t.tx.QueryRowContext(ctx, `SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1`).Scan(&seq, &prev)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return audit.Event{}, fmt.Errorf("reading audit head: %w", err)
	}
	e.Seq = seq + 1
	e.Time = e.Time.UTC()
	e = audit.Seal(prev, e)
	b, err := json.Marshal(e)
	if err != nil {
		return audit.Event{}, fmt.Errorf("encoding audit event: %w", err)
	}
	if err := t.exec(ctx, "appending audit event", `INSERT INTO audit_events(seq, hash, data) VALUES (?, ?, ?)`, e.Seq, e.Hash, b); err != nil {
		return audit.Event{}, err
	}
	return e, nil
}

func (t *txn) AuditEvents(ctx context.Context, after int64, limit int) ([]audit.Event, error) {
	rows, err := t.tx.QueryContext(ctx, `SELECT data FROM audit_events WHERE seq > ? ORDER BY seq LIMIT ?`, after, limit)
	if err != nil {
		return nil, fmt.Errorf("listing audit events: %w", err)
	}
	defer rows.Close()
	var out []audit.Event
	for rows.Next() {
		var b []byte
		if err := rows.Scan(&b); err != nil {
			return nil, fmt.Errorf("listing audit events: %w", err)
		}
		var e audit.Event
		if err := json.Unmarshal(b, &e); err != nil {
			return nil, fmt.Errorf("decoding audit event: %w", err)
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

func (t *txn) AuditHead(ctx context.Context) (audit.Event, error) {
	var b []byte
	if err := t.tx.QueryRowContext(ctx, `SELECT data FROM audit_events ORDER BY seq DESC LIMIT 1`).Scan(&b); err != nil {
		return audit.Event{}, notFound(err, "audit head")
	}
	var e audit.Event
	if err := json.Unmarshal(b, &e); err != nil {
		return audit.Event{}, fmt.Errorf("decoding audit event: %w", err)
	}
	return e, nil
}

func (t *txn) PutCheckpoint(ctx context.Context, cp audit.Checkpoint) error {
	b, err := json.Marshal(cp)
	if err != nil {
		return fmt.Errorf("encoding checkpoint: %w", err)
	}
	return t.exec(ctx, "storing checkpoint", `INSERT INTO audit_checkpoints(seq, data) VALUES (?, ?)`, cp.Seq, b)
}

func (t *txn) LatestCheckpoint(ctx context.Context) (audit.Checkpoint, error) {
	var b []byte
	if err := t.tx.QueryRowContext(ctx, `SELECT data FROM audit_checkpoints ORDER BY seq DESC LIMIT 1`).Scan(&b); err != nil {
		return audit.Checkpoint{}, notFound(err, "audit checkpoint")
	}
	var cp audit.Checkpoint
	if err := json.Unmarshal(b, &cp); err != nil {
		return audit.Checkpoint{}, fmt.Errorf("decoding checkpoint: %w", err)
	}
	return cp, nil
}

// Recordings.

func (t *txn) PutRecording(ctx context.Context, r store.Recording) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encoding recording: %w", err)
	}
	return t.exec(ctx, "storing recording", `INSERT INTO recordings(id, started, data) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET data = excluded.data`,
		r.ID, ts(r.Started), b)
}

func (t *txn) Recording(ctx context.Context, id string) (store.Recording, error) {
	var b []byte
	if err := t.tx.QueryRowContext(ctx, `SELECT data FROM recordings WHERE id = ?`, id).Scan(&b); err != nil {
		return store.Recording{}, notFound(err, "recording "+id)
	}
	var r store.Recording
	if err := json.Unmarshal(b, &r); err != nil {
		return store.Recording{}, fmt.Errorf("decoding recording: %w", err)
	}
	return r, nil
}

func (t *txn) Recordings(ctx context.Context, limit int) ([]store.Recording, error) {
	rows, err := t.tx.QueryContext(ctx, `SELECT data FROM recordings ORDER BY started DESC LIMIT ?`, limit)
	if err != nil {
		return nil, fmt.Errorf("listing recordings: %w", err)
	}
	defer rows.Close()
	var out []store.Recording
	for rows.Next() {
		var b []byte
		if err := rows.Scan(&b); err != nil {
			return nil, fmt.Errorf("listing recordings: %w", err)
		}
		var r store.Recording
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("decoding recording: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}
