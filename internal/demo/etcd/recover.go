package etcd

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Trailer keys set by EtcdRecover to describe the upload it received.
const (
	// TrailerReceivedBytes holds the number of bytes received, in decimal.
	TrailerReceivedBytes = "x-received-bytes"
	// TrailerReceivedSHA256 holds the hex SHA-256 of the bytes received.
	TrailerReceivedSHA256 = "x-received-sha256"
	// TrailerSnapshotKeys and TrailerSnapshotRevision describe a snapshot
	// a node with etcd kept: its keys and last revision.
	TrailerSnapshotKeys     = "x-etcd-snapshot-keys"
	TrailerSnapshotRevision = "x-etcd-snapshot-revision"
	// TrailerSnapshotInvalid says why a kept snapshot would not restore.
	TrailerSnapshotInvalid = "x-etcd-snapshot-invalid"
)

// EtcdRecover receives a snapshot to recover etcd from. On a node with an
// etcd member it is kept, as Talos keeps it, for a bootstrap that recovers
// (the demo's cluster is bootstrapped from the start, so none comes), and
// checked as etcd checks a snapshot before restoring one: its integrity
// hash and its database (keys and revision reported in the trailer and
// the log; a snapshot that fails the check is kept too, as Talos would, and
// the trailer says why it would not restore). A node without etcd keeps
// nothing. Either way the trailer has the upload's size and digest, so a
// caller can check that a proxy passed it through unchanged.
func (a *API) EtcdRecover(stream grpc.ClientStreamingServer[common.Data, machine.EtcdRecoverResponse]) (err error) {
	h := sha256.New()
	w := io.Writer(h)
	var kept *os.File
	if e := a.member; e != nil {
		if kept, err = os.CreateTemp(filepath.Dir(e.RecoveryPath()), ".recovery-*"); err != nil {
			return fmt.Errorf("error creating etcd recovery snapshot: %w", err)
		}
		defer func() {
			_ = kept.Close()
			_ = os.Remove(kept.Name()) // gone after the rename
		}()
		w = io.MultiWriter(h, kept)
	}
	var n int64
	for {
		chunk, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if _, err := w.Write(chunk.GetBytes()); err != nil {
			return fmt.Errorf("error writing snapshot: %w", err)
		}
		n += int64(len(chunk.GetBytes()))
	}
	sum := hex.EncodeToString(h.Sum(nil))
	trailer := metadata.Pairs(TrailerReceivedBytes, strconv.FormatInt(n, 10), TrailerReceivedSHA256, sum)
	if kept == nil {
		a.log.Info("etcd snapshot received; a node without etcd discards it", "bytes", n, "sha256", sum)
	} else {
		if err := kept.Sync(); err != nil {
			return fmt.Errorf("error fsyncing snapshot: %w", err)
		}
		if err := kept.Close(); err != nil {
			return fmt.Errorf("error closing snapshot: %w", err)
		}
		path := a.member.RecoveryPath()
		if err := os.Rename(kept.Name(), path); err != nil {
			return fmt.Errorf("error storing snapshot: %w", err)
		}
		keys, rev, verr := CheckSnapshot(path)
		if verr != nil {
			trailer.Append(TrailerSnapshotInvalid, verr.Error())
			a.log.Warn("etcd recovery snapshot stored, but it would not restore", "path", path, "bytes", n, "err", verr)
		} else {
			trailer.Append(TrailerSnapshotKeys, strconv.Itoa(keys))
			trailer.Append(TrailerSnapshotRevision, strconv.FormatInt(rev, 10))
			a.log.Info("etcd recovery snapshot stored", "path", path, "bytes", n, "keys", keys, "revision", rev)
		}
	}
	stream.SetTrailer(trailer)
	return stream.SendAndClose(&machine.EtcdRecoverResponse{Messages: []*machine.EtcdRecover{{}}})
}

// CheckSnapshot checks the snapshot at path as etcd does before it
// restores one: the SHA-256 etcd appends to a snapshot must match what
// precedes it, and that must be etcd's database. It returns the number of
// keys (every revision of every key) and the last revision.
func CheckSnapshot(path string) (keys int, revision int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return 0, 0, err
	}
	size := info.Size()
	if size%512 != sha256.Size {
		return 0, 0, fmt.Errorf("%d bytes: not a snapshot of etcd's maintenance API (a database of whole pages and its SHA-256)", size)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, f, size-sha256.Size); err != nil {
		return 0, 0, err
	}
	want := make([]byte, sha256.Size)
	if _, err := io.ReadFull(f, want); err != nil {
		return 0, 0, err
	}
	if !bytes.Equal(h.Sum(nil), want) {
		return 0, 0, errors.New("the snapshot's SHA-256 does not match its contents (cut short or altered)")
	}
	// bbolt reads the pages it needs; the hash after the last is ignored.
	db, err := bolt.Open(path, 0o400, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		return 0, 0, fmt.Errorf("not etcd's database: %w", err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("key"))
		if b == nil {
			return errors.New("not etcd's database: no key bucket")
		}
		keys = b.Stats().KeyN
		if last, _ := b.Cursor().Last(); len(last) >= 8 {
			revision = int64(binary.BigEndian.Uint64(last[:8]))
		}
		return nil
	})
	return keys, revision, err
}
