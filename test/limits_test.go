package test

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
)

// h2conn opens a TLS connection to addr with cert and speaks just enough
// HTTP/2 to be a live client: the preface, its settings, and answers to
// the server's pings.
func h2conn(t *testing.T, c *memCluster, addr string, cert tls.Certificate) (*tls.Conn, *http2.Framer) {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, clientTLS(c.pki.pool, &cert))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return conn, fr
}

// untilClosed reads frames, answering pings, until the server closes the
// connection or timeout passes; it reports whether a GOAWAY came first.
func untilClosed(conn *tls.Conn, fr *http2.Framer, timeout time.Duration) (goaway, closed bool) {
	_ = conn.SetDeadline(time.Now().Add(timeout))
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			var ne net.Error
			return goaway, !(errors.As(err, &ne) && ne.Timeout())
		}
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			goaway = true
		case *http2.PingFrame:
			if !f.IsAck() {
				_ = fr.WritePing(true, f.Data)
			}
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = fr.WriteSettingsAck()
			}
		}
	}
}

func TestIdleClientConnectionsAreClosed(t *testing.T) {
	c := startMemCluster(t, 97, 1, "maxConnectionIdle: 1s\n")
	addr := net.JoinHostPort(c.ips[0], strconv.Itoa(c.port))
	conn, fr := h2conn(t, c, addr, c.admin)
	start := time.Now()
	goaway, closed := untilClosed(conn, fr, 15*time.Second)
	took := time.Since(start)
	t.Logf("an idle connection that answers pings was closed after %v (maxConnectionIdle 1s), GOAWAY first: %v", took.Round(10*time.Millisecond), goaway)
	if !closed || !goaway {
		t.Fatalf("idle connection: GOAWAY %v, closed %v within 15 s; want both", goaway, closed)
	}
}

func TestConnectionLimits(t *testing.T) {
	c := startMemCluster(t, 98, 1, "limits:\n  connections: 4\n  connectionsPerIdentity: 2\n")
	addr := net.JoinHostPort(c.ips[0], strconv.Itoa(c.port))
	reader := c.pki.load(t, "reader")
	open := func(cert tls.Certificate) (*tls.Conn, error) {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, clientTLS(c.pki.pool, &cert))
		if err != nil {
			return nil, err
		}
		// The server's settings arrive only once it has accepted the
		// client's certificate and its identity is under its limit.
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Read(make([]byte, 1)); err != nil {
			conn.Close()
			return nil, err
		}
		_ = conn.SetDeadline(time.Time{})
		t.Cleanup(func() { conn.Close() })
		return conn, nil
	}

	var readers []*tls.Conn
	for i := range 2 {
		conn, err := open(reader)
		if err != nil {
			t.Fatalf("reader connection %d of 2: %v", i+1, err)
		}
		readers = append(readers, conn)
	}
	if _, err := open(reader); err == nil {
		t.Fatal("a third reader connection was accepted over connectionsPerIdentity 2")
	}
	if !c.procs[0].waitOutput("limits.connectionsPerIdentity reached", 1, 5*time.Second) {
		t.Error("the refusal by connectionsPerIdentity was not logged")
	}
	for i := range 2 {
		if _, err := open(c.admin); err != nil {
			t.Fatalf("admin connection %d: %v (another identity has its own allowance)", i+1, err)
		}
	}
	// Four connections are open: a fifth is closed at accept, before any
	// handshake, whoever it is.
	if _, err := open(c.admin); err == nil {
		t.Fatal("a fifth connection was accepted over connections 4")
	}
	if !c.procs[0].waitOutput("limits.connections reached", 1, 5*time.Second) {
		t.Error("the refusal by connections was not logged")
	}
	// A closed connection gives its place back.
	readers[0].Close()
	if !testkit.Eventually(10*time.Second, func() bool { _, err := open(reader); return err == nil }) {
		t.Fatal("a reader could not connect again after closing one of its connections")
	}
}

func TestBufferedBytesLimitRefusesNewCallsOnly(t *testing.T) {
	c := startMemCluster(t, 99, 1, "limits:\n  bufferedBytes: 1MiB\n")
	cc := c.dial(t, 0, c.admin)
	mc := machine.NewMachineServiceClient(cc)
	ctx := testkit.Context(t)
	// Unread streams of the big file, fanned out to the node itself: each
	// holds what its node buffer and relay hold.
	var streams []machine.MachineService_ReadClient
	for range 40 {
		s, err := mc.Read(metadata.AppendToOutgoingContext(ctx, "nodes", c.ips[0]), &machine.ReadRequest{Path: c.file})
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
	}
	var refusal error
	if !testkit.Eventually(20*time.Second, func() bool {
		_, refusal = mc.Version(ctx, &emptypb.Empty{})
		return status.Code(refusal) == codes.ResourceExhausted
	}) {
		t.Fatalf("with 40 unread streams held, a new call got %v, want ResourceExhausted", refusal)
	}
	if !strings.Contains(refusal.Error(), "limits.bufferedBytes") {
		t.Errorf("refusal %q does not name the limit", refusal)
	}
	t.Logf("refused: %v", refusal)
	if n := scrape(t, c.metrics[0], `apid_limit_refusals_total{limit="bufferedBytes"}`); n < 1 {
		t.Errorf("refusals by bufferedBytes exported as %v", n)
	}
	// Running calls are not harmed: each stream delivers the whole file.
	for i, s := range streams {
		n := 0
		for {
			d, err := s.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("stream %d after the refusal: %v", i, err)
			}
			n += len(d.Bytes)
		}
		if n != bigFile {
			t.Fatalf("stream %d delivered %d bytes, want %d", i, n, bigFile)
		}
	}
	if _, err := mc.Version(ctx, &emptypb.Empty{}); err != nil {
		t.Fatalf("a call once the held bytes were sent: %v", err)
	}
}
