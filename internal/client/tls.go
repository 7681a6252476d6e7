package client

import (
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/pinhole-dev/pinhole/internal/devicekey"
)

// maxCAFileBytes bounds the broker CA file.
const maxCAFileBytes = 1 << 20

// certRefresh is how long a device certificate is used before a fresh one is
// made (devicekey certificates are valid for 24 hours).
const certRefresh = time.Hour

// DeviceHTTPClient returns an HTTP client for the broker: TLS 1.3 only,
// trusting only the CA certificates in the PEM file brokerCAFile, and
// presenting deviceKey as a self-signed client certificate
// (devicekey.TLSCertificate), remade every hour. The client has no overall
// timeout; bound calls with their context.
func DeviceHTTPClient(brokerCAFile string, deviceKey ed25519.PrivateKey) (*http.Client, error) {
	if len(deviceKey) != ed25519.PrivateKeySize {
		return nil, errors.New("device HTTP client: device key is not an Ed25519 private key")
	}
	pool, err := loadCAPool(brokerCAFile)
	if err != nil {
		return nil, err
	}
	cs := &certSource{key: deviceKey, now: time.Now}
	if _, err := cs.get(); err != nil {
		return nil, err
	}
	base, ok := http.DefaultTransport.(*http.Transport)
	if !ok {
		return nil, errors.New("device HTTP client: http.DefaultTransport is not an *http.Transport")
	}
	tr := base.Clone()
	tr.TLSClientConfig = &tls.Config{
		MinVersion: tls.VersionTLS13,
		RootCAs:    pool,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cs.get()
		},
	}
	tr.ForceAttemptHTTP2 = true
	return &http.Client{Transport: tr}, nil
}

// loadCAPool reads a PEM bundle of CA certificates.
func loadCAPool(path string) (*x509.CertPool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading broker CA: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxCAFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading broker CA %s: %w", path, err)
	}
	if len(b) > maxCAFileBytes {
		return nil, fmt.Errorf("broker CA %s is larger than %d bytes", path, maxCAFileBytes)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("broker CA %s holds no PEM certificate", path)
	}
	return pool, nil
}

// certSource hands out the device certificate, remaking it when it is old.
type certSource struct {
	key ed25519.PrivateKey
	now func() time.Time

	mu   sync.Mutex
	cert *tls.Certificate // guarded by mu
	made time.Time        // guarded by mu
}

func (s *certSource) get() (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if s.cert != nil && now.Sub(s.made) < certRefresh && !now.Before(s.made) {
		return s.cert, nil
	}
	c, err := devicekey.TLSCertificate(s.key, now)
	if err != nil {
		return nil, fmt.Errorf("device HTTP client: %w", err)
	}
	s.cert, s.made = &c, now
	return s.cert, nil
}
