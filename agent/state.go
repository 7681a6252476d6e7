package agent

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
)

// Files and directories inside the state directory.
const (
	deviceKeyFile  = "device.key"
	stateFile      = "agent.json"
	brokerCAFile   = "broker-ca.pem"
	socketFile     = "agent.sock"
	grantsDir      = "grants"
	grantKeyFile   = "id_ed25519"
	grantCertFile  = "id_ed25519-cert.pub"
	knownHostsFile = "known_hosts"

	maxStateFileBytes = 64 << 10
	maxCAFileBytes    = 1 << 20
)

// SocketPath returns the local API socket of the agent whose state directory
// is stateDir.
func SocketPath(stateDir string) string { return filepath.Join(stateDir, socketFile) }

// enrollment is agent.json: what Enroll learned, what Run needs.
type enrollment struct {
	BrokerURL string `json:"broker_url"`
	DeviceID  string `json:"device_id"`
	User      string `json:"user"`
}

func loadEnrollment(dir string) (enrollment, error) {
	p := filepath.Join(dir, stateFile)
	b, err := readBounded(p, maxStateFileBytes)
	if errors.Is(err, os.ErrNotExist) {
		return enrollment{}, fmt.Errorf("this workstation is not enrolled (no %s; run pinhole-agent enroll)", p)
	}
	if err != nil {
		return enrollment{}, err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var e enrollment
	if err := dec.Decode(&e); err != nil {
		return enrollment{}, fmt.Errorf("reading %s: %w", p, err)
	}
	if e.BrokerURL == "" || e.DeviceID == "" || e.User == "" {
		return enrollment{}, fmt.Errorf("reading %s: broker_url, device_id and user are required", p)
	}
	return e, nil
}

func saveEnrollment(dir string, e enrollment) error {
	b, err := json.MarshalIndent(e, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding %s: %w", stateFile, err)
	}
	return writeFileAtomic(filepath.Join(dir, stateFile), append(b, '\n'), 0o600)
}

// copyCA checks that src holds at least one PEM certificate and copies it to
// the state directory.
func copyCA(src, dir string) error {
	b, err := readBounded(src, maxCAFileBytes)
	if err != nil {
		return fmt.Errorf("reading broker CA: %w", err)
	}
	if !x509.NewCertPool().AppendCertsFromPEM(b) {
		return fmt.Errorf("broker CA %s holds no PEM certificate", src)
	}
	return writeFileAtomic(filepath.Join(dir, brokerCAFile), b, 0o644)
}

// readBounded reads a file of at most max bytes.
func readBounded(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, max)
	}
	return b, nil
}

// writeFileAtomic writes data to path with mode perm through a temporary
// file in the same directory, so readers never see a partial file.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// requestIDPattern is what the agent accepts as a request ID: it names a
// directory under grants/, so it must be one safe path component.
var requestIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

func validRequestID(id string) bool { return requestIDPattern.MatchString(id) }
