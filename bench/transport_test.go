package bench

// The node-transport experiment of the performance issue: can a call to a
// node cost the gateway less than grpc-go's client stream? leanConn is a
// minimal gRPC-over-HTTP/2 unary caller on one TLS connection, driven with
// golang.org/x/net/http2's framer and HPACK encoder: a call's HEADERS and
// DATA leave in one write, one reader goroutine a connection, no stream
// goroutine, no per-call context machinery. It is an experiment and only
// what a unary call needs (no request flow control beyond the peer's
// initial window, no keepalive, no reconnection, no GOAWAY drain): it
// measures the floor, and BenchmarkNodeTransport compares it with
// grpc-go's Invoke on the same connections to a node in another process.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/pki"
)

// nodeEnv makes the test binary a node: the test MachineService behind
// mutual TLS, its configuration in JSON.
const nodeEnv = "APID_BENCH_NODE"

type nodeConfig struct{ Listen, CA, Cert, Key string }

func runNode(cfgJSON string) error {
	var cfg nodeConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		return err
	}
	roots, pair, err := loadIdentity(cfg.CA, cfg.Cert, cfg.Key)
	if err != nil {
		return err
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{pair}, ClientCAs: roots,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13})))
	machine.RegisterMachineServiceServer(s, testbackend.New("node", testbackend.Behaviour{}))
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	return serveUntilSignal(s, lis, "node serving")
}

// rawBytes passes a message's bytes through grpc-go unchanged.
type rawBytes struct{ b []byte }

type rawBytesCodec struct{}

func (rawBytesCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.(*rawBytes).b)}, nil
}

func (rawBytesCodec) Unmarshal(data mem.BufferSlice, v any) error {
	v.(*rawBytes).b = data.Materialize()
	return nil
}

func (rawBytesCodec) Name() string { return "proto" }

var _ encoding.CodecV2 = rawBytesCodec{}

// leanConn is the experiment's node connection.
type leanConn struct {
	tc        *tls.Conn
	fr        *http2.Framer
	authority string

	wmu   sync.Mutex // the framer's write side, wbuf, enc, hbuf, next
	wbuf  bytes.Buffer
	enc   *hpack.Encoder
	hbuf  bytes.Buffer
	next  uint32
	unack uint32 // received bytes not yet returned to the connection window (reader only)

	mu    sync.Mutex
	calls map[uint32]*leanCall
	err   error
}

type leanCall struct {
	data      []byte
	status    codes.Code
	msg       string
	gotStatus bool
	done      chan struct{}
}

func dialLean(addr string, cfg *tls.Config) (*leanConn, error) {
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"h2"}
	tc, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	c := &leanConn{tc: tc, authority: addr, next: 1, calls: map[uint32]*leanCall{}}
	c.fr = http2.NewFramer(&c.wbuf, bufio.NewReaderSize(tc, 16<<10))
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.enc = hpack.NewEncoder(&c.hbuf)
	c.wbuf.WriteString(http2.ClientPreface)
	if err := c.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20}); err != nil {
		return nil, err
	}
	if err := c.fr.WriteWindowUpdate(0, 1<<24); err != nil {
		return nil, err
	}
	if err := c.flushLocked(); err != nil {
		return nil, err
	}
	go c.readLoop()
	return c, nil
}

func (c *leanConn) flushLocked() error {
	_, err := c.tc.Write(c.wbuf.Bytes())
	c.wbuf.Reset()
	return err
}

func (c *leanConn) Close() error { return c.tc.Close() }

// Invoke sends req to method and returns the reply's message bytes.
func (c *leanConn) Invoke(ctx context.Context, method string, req []byte) ([]byte, error) {
	call := &leanCall{done: make(chan struct{})}
	c.wmu.Lock()
	id := c.next
	c.next += 2
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		c.wmu.Unlock()
		return nil, c.err
	}
	c.calls[id] = call
	c.mu.Unlock()
	c.hbuf.Reset()
	for _, f := range [...]hpack.HeaderField{
		{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "https"}, {Name: ":path", Value: method},
		{Name: ":authority", Value: c.authority}, {Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"},
	} {
		_ = c.enc.WriteField(f)
	}
	err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.hbuf.Bytes(), EndHeaders: true})
	if err == nil {
		var prefix [5]byte
		binary.BigEndian.PutUint32(prefix[1:], uint32(len(req)))
		err = c.fr.WriteData(id, true, append(prefix[:], req...))
	}
	if err == nil {
		err = c.flushLocked() // HEADERS and DATA in one write
	}
	c.wmu.Unlock()
	if err != nil {
		return nil, err
	}
	select {
	case <-call.done:
	case <-ctx.Done():
		c.wmu.Lock()
		_ = c.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		_ = c.flushLocked()
		c.wmu.Unlock()
		c.mu.Lock()
		delete(c.calls, id)
		c.mu.Unlock()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if !call.gotStatus {
		return nil, status.Error(codes.Internal, "no grpc-status")
	}
	if call.status != codes.OK {
		return nil, status.Error(call.status, call.msg)
	}
	if len(call.data) < 5 {
		return nil, status.Error(codes.Internal, "no message")
	}
	return call.data[5:], nil
}

func (c *leanConn) readLoop() {
	fail := func(err error) {
		c.mu.Lock()
		c.err = err
		calls := c.calls
		c.calls = map[uint32]*leanCall{}
		c.mu.Unlock()
		for _, call := range calls {
			call.status, call.msg, call.gotStatus = codes.Unavailable, err.Error(), true
			close(call.done)
		}
	}
	finish := func(id uint32) {
		c.mu.Lock()
		call := c.calls[id]
		delete(c.calls, id)
		c.mu.Unlock()
		if call != nil {
			close(call.done)
		}
	}
	lookup := func(id uint32) *leanCall {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.calls[id]
	}
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			fail(err)
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				c.wmu.Lock()
				_ = c.fr.WriteSettingsAck()
				_ = c.flushLocked()
				c.wmu.Unlock()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				c.wmu.Lock()
				_ = c.fr.WritePing(true, f.Data)
				_ = c.flushLocked()
				c.wmu.Unlock()
			}
		case *http2.MetaHeadersFrame:
			call := lookup(f.StreamID)
			if call == nil {
				continue
			}
			for _, hf := range f.Fields {
				switch hf.Name {
				case "grpc-status":
					n, _ := strconv.Atoi(hf.Value)
					call.status, call.gotStatus = codes.Code(n), true
				case "grpc-message":
					call.msg = hf.Value
				}
			}
			if f.StreamEnded() {
				finish(f.StreamID)
			}
		case *http2.DataFrame:
			n := uint32(len(f.Data()))
			if call := lookup(f.StreamID); call != nil {
				call.data = append(call.data, f.Data()...)
			}
			if c.unack += n; c.unack > 1<<20 {
				c.wmu.Lock()
				_ = c.fr.WriteWindowUpdate(0, c.unack)
				_ = c.flushLocked()
				c.wmu.Unlock()
				c.unack = 0
			}
			if f.StreamEnded() {
				finish(f.StreamID)
			}
		case *http2.RSTStreamFrame:
			if call := lookup(f.StreamID); call != nil {
				call.status, call.msg, call.gotStatus = codes.Unavailable, "stream reset: "+f.ErrCode.String(), true
			}
			finish(f.StreamID)
		case *http2.GoAwayFrame:
			fail(errors.New("GOAWAY: " + f.ErrCode.String()))
			return
		}
	}
}

// startNodeProcess runs a node in a process of its own on 127.0.74.1.
func startNodeProcess(tb testing.TB, ca *pki.CA, dir string) string {
	tb.Helper()
	const ip = "127.0.74.1"
	crt, key, err := ca.IssueNode("node", nil, []net.IP{net.ParseIP(ip)}, time.Hour, pki.KeyECDSA)
	if err != nil {
		tb.Fatal(err)
	}
	f := &gatewayFleet{dir: dir}
	addr := net.JoinHostPort(ip, strconv.Itoa(sharedPort(tb, []string{ip})))
	cfg, _ := json.Marshal(nodeConfig{Listen: addr, CA: f.write(tb, "ca.crt", ca.CertPEM), Cert: f.write(tb, "node.crt", crt), Key: f.write(tb, "node.key", key)})
	startHelper(tb, nodeEnv, string(cfg), "node serving")
	return addr
}

// processCPU is this process's user and system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkNodeTransport: Version to 100 connections to a node at once, as
// a fan-out to 100 nodes sends it, through grpc-go's Invoke (as apid's
// proxy calls a node) and through leanConn; the CPU this process spent per
// node call is reported as client-µs/call.
func BenchmarkNodeTransport(b *testing.B) {
	const conns = 100
	ca, err := pki.NewCA("bench", time.Hour, pki.KeyECDSA)
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	addr := startNodeProcess(b, ca, dir)
	crt, key, err := ca.IssueForwarding("gateway", time.Hour, pki.KeyECDSA)
	if err != nil {
		b.Fatal(err)
	}
	pair, _ := tls.X509KeyPair(crt, key)
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.CertPEM)
	tlsCfg := &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}, ServerName: "127.0.74.1", MinVersion: tls.VersionTLS13}
	req, _ := proto.Marshal(&emptypb.Empty{})
	const method = "/machine.MachineService/Version"
	check := func(reply []byte) error {
		var v machine.VersionResponse
		if err := proto.Unmarshal(reply, &v); err != nil || len(v.GetMessages()) != 1 {
			return fmt.Errorf("reply %x: %v", reply, err)
		}
		return nil
	}
	run := func(b *testing.B, call func(ctx context.Context, i int) error) {
		ctx := context.Background()
		for i := range conns { // connections up and warm
			if err := call(ctx, i); err != nil {
				b.Fatal(err)
			}
		}
		b.ResetTimer()
		cpu0 := processCPU()
		var wg sync.WaitGroup
		var failed error
		var mu sync.Mutex
		for b.Loop() {
			for i := range conns {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := call(ctx, i); err != nil {
						mu.Lock()
						failed = err
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
		}
		b.ReportMetric(float64((processCPU()-cpu0).Microseconds())/float64(b.N*conns), "client-µs/call")
		if failed != nil {
			b.Fatal(failed)
		}
	}
	b.Run("via=grpc-go", func(b *testing.B) {
		var ccs []*grpc.ClientConn
		for range conns {
			cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
			if err != nil {
				b.Fatal(err)
			}
			ccs = append(ccs, cc)
		}
		defer func() {
			for _, cc := range ccs {
				cc.Close()
			}
		}()
		run(b, func(ctx context.Context, i int) error {
			var reply rawBytes
			if err := ccs[i].Invoke(ctx, method, &rawBytes{b: req}, &reply, grpc.ForceCodecV2(rawBytesCodec{})); err != nil {
				return err
			}
			return check(reply.b)
		})
	})
	b.Run("via=lean", func(b *testing.B) {
		var lcs []*leanConn
		for range conns {
			lc, err := dialLean(addr, tlsCfg)
			if err != nil {
				b.Fatal(err)
			}
			lcs = append(lcs, lc)
		}
		defer func() {
			for _, lc := range lcs {
				lc.Close()
			}
		}()
		run(b, func(ctx context.Context, i int) error {
			reply, err := lcs[i].Invoke(ctx, method, req)
			if err != nil {
				return err
			}
			return check(reply)
		})
	})
}
