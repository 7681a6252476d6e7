package broker

import (
	"fmt"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/policy"
	"github.com/pinhole-dev/pinhole/internal/sshca"
)

// hostCerts issues and caches the proxy's host certificate per target, so a
// user who trusts the host CA once never sees a TOFU prompt.
type hostCerts struct {
	ca, key ssh.Signer
	mu      sync.Mutex
	certs   map[string]hostCert
}

type hostCert struct {
	signer ssh.Signer
	until  time.Time
}

const hostCertLife = 24 * time.Hour

func (h *hostCerts) signer(tg policy.Target, now time.Time) (ssh.Signer, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if c, ok := h.certs[tg.Name]; ok && now.Before(c.until.Add(-time.Hour)) {
		return c.signer, nil
	}
	until := now.Add(hostCertLife)
	cert, err := sshca.IssueHost(nil, h.ca, sshca.HostCert{Key: h.key.PublicKey(), KeyID: "pinhole proxy for " + tg.Name,
		Principals: []string{tg.Name, tg.TunnelIP.String()}, ValidAfter: now.Add(-5 * time.Minute), ValidBefore: until})
	if err != nil {
		return nil, fmt.Errorf("issuing host certificate for %s: %w", tg.Name, err)
	}
	s, err := sshca.CertSigner(cert, h.key)
	if err != nil {
		return nil, err
	}
	h.certs[tg.Name] = hostCert{signer: s, until: until}
	return s, nil
}
