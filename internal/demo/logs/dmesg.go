package logs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Dmesg streams the kernel log, one formatted record per message, in the
// layout talosctl prints: facility, level, timestamp in brackets, text.
// Tail skips the records already logged; Follow keeps the stream open for
// new records until the client goes away.
//
// Where the kernel log cannot be opened or read (containers, missing
// privileges) Dmesg does not fail: it sends a line saying so, followed by
// the agent's own start-up log, all labelled as synthetic.
func (r *Registry) Dmesg(req *machine.DmesgRequest, stream grpc.ServerStreamingServer[common.Data]) (err error) {
	ctx := stream.Context()

	k, err := openKmsg(r.cfg.KernelLogPath, req.GetTail())
	if err != nil {
		return r.dmesgFallback(req, stream, err)
	}
	defer k.Close()
	if req.GetFollow() {
		stop := context.AfterFunc(ctx, k.interrupt)
		defer stop()
	}
	// Headers tell a follower that the log is open, so a record written
	// from now on will reach it.
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	readAny := false
	for {
		rec, rerr := k.next(req.GetFollow())
		switch {
		case errors.Is(rerr, errNoMoreRecords), errors.Is(rerr, io.EOF):
			return nil
		case ctx.Err() != nil:
			return status.FromContextError(ctx.Err()).Err()
		case rerr != nil && !readAny:
			return r.dmesgFallback(req, stream, rerr)
		case rerr != nil:
			return status.Errorf(codes.Unavailable, "read kernel log: %v", rerr)
		}
		readAny = true
		line, ok := formatKmsgRecord(rec, r.bootTime)
		if !ok {
			continue
		}
		if err := stream.Send(&common.Data{Bytes: []byte(line)}); err != nil {
			return err
		}
	}
}

// dmesgFallback serves the synthetic kernel log described on Dmesg.
func (r *Registry) dmesgFallback(req *machine.DmesgRequest, stream grpc.ServerStreamingServer[common.Data], reason error) error {
	r.cfg.Log.Warn("kernel log unavailable; serving synthetic lines", "error", reason.Error())
	lines := []string{fmt.Sprintf("apid example agent: kernel log unavailable (%v); this is synthetic data", reason)}
	if !req.GetTail() {
		for _, l := range r.cfg.Startup {
			lines = append(lines, "apid example agent (synthetic kernel log): "+l)
		}
	}
	for _, l := range lines {
		if err := stream.Send(&common.Data{Bytes: []byte(l + "\n")}); err != nil {
			return err
		}
	}
	if !req.GetFollow() {
		return nil
	}
	<-stream.Context().Done()
	return status.FromContextError(stream.Context().Err()).Err()
}

// kmsgRecordMax is the read size for /dev/kmsg: each read returns exactly one
// record and fails with EINVAL if the buffer is smaller than the record; the
// kernel bounds a record well below this.
const kmsgRecordMax = 16 << 10

// errNoMoreRecords reports that every record present at the time was read.
var errNoMoreRecords = errors.New("no more kernel log records")

// kmsgReader reads records from /dev/kmsg. The device is opened non-blocking
// and registered with Go's poller, which lets next either stop at the end of
// the existing records or wait for new ones, and lets interrupt end a wait.
type kmsgReader struct {
	f   *os.File
	rc  syscall.RawConn
	buf []byte
}

func openKmsg(path string, tail bool) (*kmsgReader, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	if tail {
		// /dev/kmsg accepts SEEK_END to mean "after the last record".
		if _, err := f.Seek(0, io.SeekEnd); err != nil {
			f.Close()
			return nil, err
		}
	}
	return &kmsgReader{f: f, rc: rc, buf: make([]byte, kmsgRecordMax)}, nil
}

// next returns the next record, valid until the following call. Without
// wait it returns errNoMoreRecords once the existing records are read; with
// wait it blocks until a record arrives or interrupt is called.
func (k *kmsgReader) next(wait bool) ([]byte, error) {
	for {
		var n int
		var rerr error
		err := k.rc.Read(func(fd uintptr) bool {
			n, rerr = syscall.Read(int(fd), k.buf)
			return !wait || !errors.Is(rerr, syscall.EAGAIN)
		})
		switch {
		case err != nil:
			return nil, err
		case errors.Is(rerr, syscall.EAGAIN):
			return nil, errNoMoreRecords
		case errors.Is(rerr, syscall.EPIPE), errors.Is(rerr, syscall.EINTR):
			// EPIPE: the kernel overwrote records before we read them; the
			// next read continues with the oldest one left.
			continue
		case rerr != nil:
			return nil, rerr
		case n == 0:
			return nil, io.EOF
		}
		return k.buf[:n], nil
	}
}

// interrupt ends a pending or later wait in next.
func (k *kmsgReader) interrupt() { _ = k.f.SetReadDeadline(time.Now()) }

func (k *kmsgReader) Close() error { return k.f.Close() }

// formatKmsgRecord turns a /dev/kmsg record
// ("prio,seq,usec,flags[,...];text\n[ KEY=value\n...]") into a log line.
// The timestamp is wall-clock time when the boot time is known, otherwise
// the time since boot.
func formatKmsgRecord(rec []byte, boot time.Time) (string, bool) {
	header, rest, ok := bytes.Cut(rec, []byte{';'})
	if !ok {
		return "", false
	}
	text, _, _ := bytes.Cut(rest, []byte{'\n'})
	fields := strings.Split(string(header), ",")
	if len(fields) < 3 {
		return "", false
	}
	prio, err := strconv.ParseUint(fields[0], 10, 32)
	if err != nil {
		return "", false
	}
	usec, err := strconv.ParseUint(fields[2], 10, 63)
	if err != nil {
		return "", false
	}
	ts := fmt.Sprintf("+%d.%06ds", usec/1e6, usec%1e6)
	if !boot.IsZero() && usec < uint64(1<<63-1)/1000 {
		ts = boot.Add(time.Duration(usec) * time.Microsecond).UTC().Format(time.RFC3339Nano)
	}
	return fmt.Sprintf("%s: %7s: [%s]: %s\n", facilityName(prio>>3), levelNames[prio&7], ts, text), true
}

var levelNames = [8]string{"emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"}

var facilityNames = []string{"kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp"}

func facilityName(f uint64) string {
	switch {
	case f < uint64(len(facilityNames)):
		return facilityNames[f]
	case f >= 16 && f <= 23:
		return "local" + strconv.FormatUint(f-16, 10)
	}
	return strconv.FormatUint(f, 10)
}

// bootTime estimates when the machine booted from /proc/uptime; it returns
// the zero time when that is unavailable.
func bootTime() time.Time {
	data, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return time.Time{}
	}
	first, _, _ := strings.Cut(string(data), " ")
	secs, err := strconv.ParseFloat(first, 64)
	if err != nil || secs < 0 {
		return time.Time{}
	}
	return time.Now().Add(-time.Duration(secs * float64(time.Second)))
}
