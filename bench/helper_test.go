package bench

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
)

// Helper processes: the test binary re-run with one environment variable
// holding a configuration (see TestMain) serves as another program would,
// so that its CPU is its own.

// startHelper runs the test binary with env=cfg until the test ends and
// returns once the helper has written ready to its standard error.
func startHelper(tb testing.TB, env, cfg, ready string) *exec.Cmd {
	tb.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), env+"="+cfg)
	return startProcess(tb, cmd, ready)
}

// startProcess starts cmd, stopped (SIGTERM, then SIGKILL after 10 s)
// when the test ends, and returns once it has written ready to its
// standard error (read to its end, so that it never blocks on its log).
func startProcess(tb testing.TB, cmd *exec.Cmd, ready string) *exec.Cmd {
	tb.Helper()
	out, err := cmd.StderrPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	seen := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		sent := false
		for sc.Scan() { // read to the end: a helper never blocks on its log
			if !sent && strings.Contains(sc.Text(), ready) {
				seen <- true
				sent = true
			}
		}
		if !sent {
			seen <- false
		}
	}()
	select {
	case ok := <-seen:
		if !ok {
			tb.Fatalf("%s exited before serving", cmd.Path)
		}
	case <-time.After(30 * time.Second):
		tb.Fatalf("%s not serving after 30 s", cmd.Path)
	}
	return cmd
}

// loadIdentity reads a CA and a key pair from files.
func loadIdentity(caFile, certFile, keyFile string) (*x509.CertPool, tls.Certificate, error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	return pool, pair, err
}

// serveUntilSignal serves srv on lis until SIGTERM, having written ready.
func serveUntilSignal(srv *grpc.Server, lis net.Listener, ready string) error {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	go func() {
		<-sig
		srv.Stop()
	}()
	fmt.Fprintln(os.Stderr, ready, "on", lis.Addr())
	return srv.Serve(lis)
}
