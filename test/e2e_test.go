package test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/hashicorp/go-multierror"
	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
)

// nodeErrors returns the per-node errors the official client reports.
func nodeErrors(t *testing.T, err error) []*client.NodeError {
	t.Helper()
	if err == nil {
		return nil
	}
	var me *multierror.Error
	if !errors.As(err, &me) {
		t.Fatalf("error %v is not the client's multi-error", err)
	}
	var out []*client.NodeError
	for _, e := range me.Errors {
		var ne *client.NodeError
		if !errors.As(e, &ne) {
			t.Fatalf("error %v is not a node error", e)
		}
		out = append(out, ne)
	}
	return out
}

func TestDemoCluster(t *testing.T) {
	c := startDemo(t, 77, 3)
	cl := c.client(t, c.endpoint(0))

	t.Run("fan-out Version is stamped by every node", func(t *testing.T) {
		resp, err := cl.Version(client.WithNodes(testkit.Context(t), c.nodes...))
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, m := range resp.Messages {
			got = append(got, m.Metadata.GetHostname())
			if m.Version.GetTag() == "" {
				t.Errorf("entry of %s has no version", m.Metadata.GetHostname())
			}
		}
		if !slices.Equal(got, c.nodes) {
			t.Fatalf("entries from %v, want %v in request order", got, c.nodes)
		}
	})

	t.Run("unreachable node is one node error, the rest arrive", func(t *testing.T) {
		dead := "127.0.77.99"
		resp, err := client.FilterMessages(cl.MachineClient.Hostname(client.WithNodes(testkit.Context(t), append(slices.Clone(c.nodes), dead)...), &emptypb.Empty{}))
		errs := nodeErrors(t, err)
		if len(errs) != 1 || errs[0].Node != dead {
			t.Fatalf("node errors %v, want one for %s", err, dead)
		}
		if resp == nil || len(resp.Messages) != 3 {
			t.Fatalf("reply %v, want the 3 live nodes", resp)
		}
		for i, m := range resp.Messages {
			if want := fmt.Sprintf("node-%d", i+1); m.Hostname != want || m.Metadata.GetHostname() != c.nodes[i] {
				t.Errorf("entry %d = %s from %s, want %s from %s", i, m.Hostname, m.Metadata.GetHostname(), want, c.nodes[i])
			}
		}
	})

	t.Run("node header goes one-to-one, untouched", func(t *testing.T) {
		resp, err := cl.MachineClient.Hostname(client.WithNode(testkit.Context(t), c.nodes[1]), &emptypb.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Messages) != 1 || resp.Messages[0].Hostname != "node-2" || resp.Messages[0].Metadata != nil {
			t.Fatalf("reply %v, want node-2's own unstamped reply", resp)
		}
	})

	t.Run("no routing metadata reaches the local node", func(t *testing.T) {
		for i := range c.nodes {
			resp, err := c.client(t, c.endpoint(i)).MachineClient.Hostname(testkit.Context(t), &emptypb.Empty{})
			if err != nil {
				t.Fatal(err)
			}
			if want := fmt.Sprintf("node-%d", i+1); resp.Messages[0].Hostname != want {
				t.Errorf("endpoint %d answered as %s, want %s", i, resp.Messages[0].Hostname, want)
			}
		}
	})

	t.Run("node with two values is InvalidArgument", func(t *testing.T) {
		ctx := metadata.AppendToOutgoingContext(testkit.Context(t), "node", c.nodes[0], "node", c.nodes[1])
		_, err := cl.MachineClient.Hostname(ctx, &emptypb.Empty{})
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("err = %v, want InvalidArgument", err)
		}
	})

	t.Run("Dmesg fan-out streams every node's data", func(t *testing.T) {
		stream, err := cl.Dmesg(client.WithNodes(testkit.Context(t), c.nodes...), false, false)
		if err != nil {
			t.Fatal(err)
		}
		count := map[string]int{}
		for {
			d, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if d.Metadata.GetError() != "" {
				t.Fatalf("node %s failed: %s", d.Metadata.GetHostname(), d.Metadata.GetError())
			}
			if len(d.Bytes) == 0 {
				t.Errorf("empty message from %s", d.Metadata.GetHostname())
			}
			count[d.Metadata.GetHostname()]++
		}
		var hosts []string
		for h := range count {
			hosts = append(hosts, h)
		}
		sort.Strings(hosts)
		if !slices.Equal(hosts, c.nodes) {
			t.Fatalf("data from %v, want %v", hosts, c.nodes)
		}
	})

	t.Run("dead node in a stream is an error message, not a failed stream", func(t *testing.T) {
		dead := "127.0.77.98"
		stream, err := cl.Dmesg(client.WithNodes(testkit.Context(t), c.nodes[0], dead), false, false)
		if err != nil {
			t.Fatal(err)
		}
		var data, errs int
		for {
			d, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("stream failed: %v", err)
			}
			switch {
			case d.Metadata.GetError() != "":
				errs++
				if d.Metadata.GetHostname() != dead || d.Metadata.GetStatus().GetCode() != int32(codes.Unavailable) {
					t.Errorf("error message %v", d.Metadata)
				}
			case d.Metadata.GetHostname() == c.nodes[0]:
				data++
			default:
				t.Errorf("message from %q", d.Metadata.GetHostname())
			}
		}
		if data == 0 || errs != 1 {
			t.Fatalf("%d data messages and %d errors, want some and 1", data, errs)
		}
	})

	t.Run("EtcdRecover uploads one-to-one", func(t *testing.T) {
		upload := bytes.Repeat([]byte("snapshot "), 100_000)
		sum := sha256.Sum256(upload)
		var trailer metadata.MD
		resp, err := cl.EtcdRecover(client.WithNode(testkit.Context(t), c.nodes[2]), bytes.NewReader(upload), grpc.Trailer(&trailer))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Messages) != 1 {
			t.Errorf("reply %v", resp)
		}
		if got := trailer.Get("x-received-bytes"); len(got) != 1 || got[0] != fmt.Sprint(len(upload)) {
			t.Errorf("agent received %v bytes, want %d", got, len(upload))
		}
		if got := trailer.Get("x-received-sha256"); len(got) != 1 || got[0] != hex.EncodeToString(sum[:]) {
			t.Errorf("agent received sha256 %v", got)
		}
	})

	t.Run("Reboot is simulated and reaches every node", func(t *testing.T) {
		if err := cl.Reboot(client.WithNodes(testkit.Context(t), c.nodes...)); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("Read streams a file one-to-one", func(t *testing.T) {
		r, err := cl.Read(client.WithNode(testkit.Context(t), c.nodes[1]), "/proc/self/status")
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(r)
		r.Close()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(data), "Name:") {
			t.Fatalf("read %.100q", data)
		}
	})

	t.Run("Memory fan-out", func(t *testing.T) {
		resp, err := cl.Memory(client.WithNodes(testkit.Context(t), c.nodes...))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Messages) != 3 || resp.Messages[0].Meminfo.GetMemtotal() == 0 {
			t.Fatalf("reply %v", resp)
		}
	})

}

func TestServeExposesMetrics(t *testing.T) {
	c := startDemo(t, 79, 1)
	// Metrics are served by `apid serve` only: start one next to the
	// demo's node, with a certificate minted from the demo's CA.
	gen := exec.Command(apidBin, "gen", "node", "-ca-dir", c.dir, "-out", c.dir, "-name", "extra", "-ip", "127.0.79.20")
	if out, err := gen.CombinedOutput(); err != nil {
		t.Fatalf("gen node: %v\n%s", err, out)
	}
	port := freePort(t, "127.0.79.20")
	metricsPort := freePort(t, "127.0.79.20")
	start(t, "apid serving", "serve",
		"-listen", fmt.Sprintf("127.0.79.20:%d", port),
		"-ca", c.dir+"/ca.crt", "-cert", c.dir+"/extra.crt", "-key", c.dir+"/extra.key",
		"-client-cert", c.dir+"/extra-client.crt", "-client-key", c.dir+"/extra-client.key",
		"-backend", "unix://"+c.dir+"/node-1.sock", "-remote-port", fmt.Sprint(c.port),
		"-admin-listen", fmt.Sprintf("127.0.79.20:%d", metricsPort), "-drain-delay", "0")
	cl := c.client(t, fmt.Sprintf("127.0.79.20:%d", port))
	_, err := cl.Version(client.WithNodes(testkit.Context(t), c.nodes[0], "127.0.79.99"))
	if errs := nodeErrors(t, err); len(errs) != 1 || errs[0].Node != "127.0.79.99" {
		t.Fatalf("err = %v, want one node error for the dead node", err)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.79.20:%d/metrics", metricsPort))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`grpc_server_handled_total{grpc_code="OK",grpc_method="Version",grpc_service="machine.MachineService",grpc_type="unary"} 1`,
		`apid_fanout_node_results_total{code="OK",kind="unary"} 1`,
		`apid_fanout_node_results_total{code="Unavailable",kind="unary"} 1`,
		// node-1 (this apid has no self names); the dead node's connection
		// never worked and was closed with its call.
		`apid_node_connections_open 1`,
		`apid_node_connections{state="READY"} 1`,
		`apid_buffered_bytes 0`, // nothing held once the calls are over
		`apid_buffered_bytes_limit `,
		`apid_client_connections 1`,
		`apid_limit_refusals_total{limit="bufferedBytes"} 0`,
		`apid_limit_refusals_total{limit="connectionsPerIdentity"} 0`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", body)
	}

	// A gateway that would forward with its serving certificate (no
	// clientCert; serverAuth only, as apid gen node writes it) is refused
	// at start, naming the key: every call it forwarded would fail at a
	// node applying Talos's client-certificate rule.
	noIdentity := freePort(t, "127.0.79.20")
	out, err := exec.Command(apidBin, "serve",
		"-listen", fmt.Sprintf("127.0.79.20:%d", noIdentity),
		"-ca", c.dir+"/ca.crt", "-cert", c.dir+"/extra.crt", "-key", c.dir+"/extra.key",
		"-backend", "unix://"+c.dir+"/node-1.sock", "-remote-port", fmt.Sprint(c.port),
		"-admin-listen", "", "-drain-delay", "0").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "clientCert: not set, and cert") {
		t.Fatalf("serve with no identity to forward with: %v\n%s", err, out)
	}
}

func TestDemoRerunOnTheSameDirectory(t *testing.T) {
	dir := t.TempDir()
	nodes := []string{"127.0.76.11", "127.0.76.12"}
	port := freePort(t, nodes...)
	args := []string{"demo", "-dir", dir, "-nodes", "2", "-first-ip", nodes[0], "-port", fmt.Sprint(port)}
	first := start(t, "nodes up", args...)
	old, err := os.ReadFile(dir + "/talosconfig")
	if err != nil {
		t.Fatal(err)
	}
	first.stop(t)

	start(t, "nodes up", args...)
	// A talosconfig from the first run still works: the CA was kept.
	if err := os.WriteFile(dir+"/old-talosconfig", old, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientconfig.Open(dir + "/old-talosconfig")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Contexts[cfg.Context].Endpoints = []string{fmt.Sprintf("%s:%d", nodes[1], port)}
	cl, err := client.New(testkit.Context(t), client.WithConfig(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	resp, err := cl.Version(client.WithNodes(testkit.Context(t), nodes...))
	if err != nil || len(resp.Messages) != 2 {
		t.Fatalf("second run with the first run's talosconfig: %v, %v", resp, err)
	}
}
