package recording

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sync"
)

// castExt is the file name extension of asciicast recordings.
const castExt = ".cast"

// idPattern is what a recording id must look like: it becomes a file name,
// so it can never contain a path separator or a dot.
var idPattern = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)

// ErrInvalidID is returned for a recording id that does not match
// ^[a-zA-Z0-9_-]{1,64}$.
var ErrInvalidID = errors.New("recording: invalid recording id")

// FileStore keeps recordings as <id>.cast files in one directory on local
// disk.
type FileStore struct {
	dir string
}

// NewFileStore returns a store in dir, creating it with mode 0700 when
// missing.
func NewFileStore(dir string) (*FileStore, error) {
	if dir == "" {
		return nil, errors.New("recording: empty store directory")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("recording: creating store directory: %w", err)
	}
	return &FileStore{dir: dir}, nil
}

// Path returns the file path of recording id.
func (s *FileStore) Path(id string) (string, error) {
	if !idPattern.MatchString(id) {
		return "", fmt.Errorf("%w %q", ErrInvalidID, id)
	}
	return filepath.Join(s.dir, id+castExt), nil
}

// Create creates the file of a new recording (mode 0600). It fails if a
// recording with that id already exists.
func (s *FileStore) Create(id string) (*File, error) {
	path, err := s.Path(id)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("recording: creating %s: %w", path, err)
	}
	return &File{f: f, dir: s.dir, h: sha256.New()}, nil
}

// Open opens recording id for reading.
func (s *FileStore) Open(id string) (io.ReadCloser, error) {
	path, err := s.Path(id)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("recording: opening %s: %w", path, err)
	}
	return f, nil
}

// File is a recording being written. Every Write goes straight to the file
// (no buffering in user space), so a crash leaves a playable prefix, and is
// hashed on the way. It is safe for concurrent use.
type File struct {
	dir string

	mu     sync.Mutex
	f      *os.File
	h      hash.Hash
	size   int64
	closed bool
}

// Write writes p to the file and to the running hash.
func (f *File) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, ErrClosed
	}
	n, err := f.f.Write(p)
	f.h.Write(p[:n])
	f.size += int64(n)
	if err != nil {
		return n, fmt.Errorf("recording: writing %s: %w", f.f.Name(), err)
	}
	return n, nil
}

// Close syncs and closes the file and returns the hex SHA-256 and the size
// of everything written.
func (f *File) Close() (sha256hex string, size int64, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return "", 0, ErrClosed
	}
	f.closed = true
	sum := hex.EncodeToString(f.h.Sum(nil))
	if err := f.f.Sync(); err != nil {
		f.f.Close()
		return sum, f.size, fmt.Errorf("recording: syncing %s: %w", f.f.Name(), err)
	}
	if err := f.f.Close(); err != nil {
		return sum, f.size, fmt.Errorf("recording: closing %s: %w", f.f.Name(), err)
	}
	if d, err := os.Open(f.dir); err == nil {
		_ = d.Sync() // make the directory entry durable too
		d.Close()
	}
	return sum, f.size, nil
}
