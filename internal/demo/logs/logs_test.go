package logs_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/lifecycle"
	"github.com/apid/apid/internal/demo/logs"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

func TestDmesg(t *testing.T) {
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	stream, err := c.Dmesg(testkit.Context(t), &machine.DmesgRequest{})
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := nodetest.RecvAll(stream)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) == 0 {
		t.Fatal("no kernel log messages")
	}
	t.Logf("%d messages; first: %q", len(msgs), msgs[0])
	for _, m := range msgs {
		if !bytes.HasSuffix(m, []byte("\n")) || bytes.Count(m, []byte("\n")) != 1 {
			t.Fatalf("message %q is not one line", m)
		}
	}
}

func TestDmesgFallback(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "kmsg")
	c, _, _ := nodetest.Start(t, node.Config{KernelLogPath: missing}, "unix")

	t.Run("once", func(t *testing.T) {
		stream, err := c.Dmesg(testkit.Context(t), &machine.DmesgRequest{})
		if err != nil {
			t.Fatal(err)
		}
		msgs, err := nodetest.RecvAll(stream)
		if err != nil {
			t.Fatal(err)
		}
		if len(msgs) < 2 || !bytes.Contains(msgs[0], []byte("this is synthetic data")) ||
			!bytes.Contains(msgs[0], []byte(missing)) || !bytes.Contains(msgs[1], []byte("example agent ready")) {
			t.Fatalf("fallback = %q", msgs)
		}
	})
	t.Run("follow", func(t *testing.T) {
		ctx, cancel := context.WithCancel(testkit.Context(t))
		defer cancel()
		stream, err := c.Dmesg(ctx, &machine.DmesgRequest{Follow: true, Tail: true})
		if err != nil {
			t.Fatal(err)
		}
		first, err := stream.Recv()
		if err != nil || !bytes.Contains(first.GetBytes(), []byte("synthetic")) {
			t.Fatalf("first message %q, %v", first.GetBytes(), err)
		}
		cancel()
		_, err = nodetest.RecvAll(stream)
		nodetest.WantCode(t, err, codes.Canceled)
	})
}

// TestDmesgFollow drives the follow path with a FIFO standing in for
// /dev/kmsg: like the device, it is pollable and a read returns EAGAIN until
// a record is written.
func TestDmesgFollow(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "kmsg")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	// O_RDWR neither blocks nor lets the reader see end-of-file.
	w, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	c, _, _ := nodetest.Start(t, node.Config{KernelLogPath: fifo}, "unix")
	ctx, cancel := context.WithCancel(testkit.Context(t))
	defer cancel()
	stream, err := c.Dmesg(ctx, &machine.DmesgRequest{Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Header(); err != nil { // the log is open from here on
		t.Fatal(err)
	}
	if _, err := w.WriteString("3,42,2000001,-;disk on fire\n"); err != nil {
		t.Fatal(err)
	}
	d, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if got := string(d.GetBytes()); !strings.HasPrefix(got, "kern:     err: [") || !strings.HasSuffix(got, "]: disk on fire\n") {
		t.Fatalf("record = %q", got)
	}
	cancel()
	_, err = nodetest.RecvAll(stream)
	nodetest.WantCode(t, err, codes.Canceled)
}

// TestDmesgFollowKernel writes a record to the real kernel log and expects a
// following stream to deliver it. Because it leaves a line in the host's
// kernel log it runs only when APID_AGENT_TEST_KMSG_WRITE=1.
func TestDmesgFollowKernel(t *testing.T) {
	if os.Getenv("APID_AGENT_TEST_KMSG_WRITE") != "1" {
		t.Skip("set APID_AGENT_TEST_KMSG_WRITE=1 to write a test record to the kernel log")
	}
	w, err := os.OpenFile(logs.DefaultKernelLogPath, os.O_WRONLY, 0)
	if err != nil {
		t.Skipf("kernel log not writable: %v", err)
	}
	defer w.Close()
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	ctx, cancel := context.WithCancel(testkit.Context(t))
	defer cancel()
	stream, err := c.Dmesg(ctx, &machine.DmesgRequest{Follow: true, Tail: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Header(); err != nil { // the log is open from here on
		t.Fatal(err)
	}
	marker := "apid agent test marker " + strconv.FormatInt(time.Now().UnixNano(), 36)
	if _, err := w.WriteString("<6>" + marker + "\n"); err != nil {
		t.Skipf("kernel log not writable: %v", err)
	}
	for {
		d, err := stream.Recv()
		if err != nil {
			t.Fatalf("waiting for %q: %v", marker, err)
		}
		if bytes.Contains(d.GetBytes(), []byte("synthetic data")) {
			t.Skipf("kernel log not readable: %s", d.GetBytes())
		}
		if bytes.Contains(d.GetBytes(), []byte(marker)) {
			if !bytes.Contains(d.GetBytes(), []byte("info")) {
				t.Errorf("record %q lacks its level", d.GetBytes())
			}
			break
		}
	}
	cancel()
	_, err = nodetest.RecvAll(stream)
	nodetest.WantCode(t, err, codes.Canceled)
}

func TestLogs(t *testing.T) {
	c, _, srv := nodetest.Start(t, node.Config{Hostname: "logs-node", BesideServices: []string{"apid"}}, "unix")
	logs := func(t *testing.T, req *machine.LogsRequest) ([][]byte, error) {
		stream, err := c.Logs(testkit.Context(t), req)
		if err != nil {
			return nil, err
		}
		return nodetest.RecvAll(stream)
	}
	// Two served calls so that the log holds more than the start-up line.
	for range 2 {
		if _, err := c.Hostname(testkit.Context(t), &emptypb.Empty{}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("all", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "agent", TailLines: -1})
		if err != nil {
			t.Fatal(err)
		}
		if len(lines) < 3 || !bytes.Contains(lines[0], []byte("example agent ready")) ||
			!bytes.Contains(lines[1], []byte("grpc.method=Hostname")) {
			t.Fatalf("lines = %q", lines)
		}
	})
	t.Run("tail", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "apid-agent", TailLines: 1})
		if err != nil {
			t.Fatal(err)
		}
		if len(lines) != 1 || !bytes.Contains(lines[0], []byte("finished call")) {
			t.Fatalf("lines = %q", lines)
		}
	})
	t.Run("zero tail", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "agent"})
		if err != nil || len(lines) != 0 {
			t.Fatalf("lines = %q, %v; want none", lines, err)
		}
	})
	t.Run("unknown id", func(t *testing.T) {
		_, err := logs(t, &machine.LogsRequest{Id: "kubelet"})
		nodetest.WantCode(t, err, codes.NotFound)
		if !strings.HasSuffix(status.Convert(err).Message(), `log "kubelet" was not registered`) {
			t.Errorf("not machined's words: %v", err)
		}
	})
	t.Run("machined is the agent's own", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "machined", TailLines: -1})
		if err != nil || len(lines) < 3 || !bytes.Contains(lines[0], []byte("example agent ready")) {
			t.Fatalf("lines = %q, %v", lines, err)
		}
	})
	t.Run("a simulated service's", func(t *testing.T) {
		if _, err := c.ServiceRestart(testkit.Context(t), &machine.ServiceRestartRequest{Id: lifecycle.SimulatedServices[0]}); err != nil {
			t.Fatal(err)
		}
		lines, err := logs(t, &machine.LogsRequest{Id: lifecycle.SimulatedServices[0], TailLines: -1})
		if err != nil {
			t.Fatal(err)
		}
		text := string(bytes.Join(lines, nil))
		for _, want := range []string{"service[" + lifecycle.SimulatedServices[0] + "](Preparing): Simulated start (agent start)", "(Running)", "(Stopping): Simulated stop (restart requested through the API)"} {
			if !strings.Contains(text, want) {
				t.Errorf("no %q in\n%s", want, text)
			}
		}
		last, err := logs(t, &machine.LogsRequest{Id: lifecycle.SimulatedServices[0], TailLines: 1})
		if err != nil || len(last) != 1 || !bytes.Contains(last[0], []byte("Health check successful")) {
			t.Errorf("tail 1: %q, %v", last, err)
		}
	})
	t.Run("kernel", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "kernel", TailLines: 2})
		if err != nil || len(lines) == 0 || len(lines) > 2 {
			t.Fatalf("kernel tail 2: %d lines, %v", len(lines), err)
		}
		// (Not compared line for line: other tests' network namespaces
		// make the kernel log as this runs.)
		all, err := logs(t, &machine.LogsRequest{Id: "kernel", TailLines: -1})
		if err != nil || len(all) < len(lines) {
			t.Fatalf("kernel: %d lines, %v; its tail of 2 had %d", len(all), err, len(lines))
		}
	})
	t.Run("controller-runtime", func(t *testing.T) {
		// The runtime logs each controller it starts.
		var text string
		testkit.Eventually(5*time.Second, func() bool {
			lines, err := logs(t, &machine.LogsRequest{Id: "controller-runtime", TailLines: -1})
			if err != nil {
				t.Fatal(err)
			}
			text = string(bytes.Join(lines, nil))
			return strings.Contains(text, "MachineTypeController")
		})
		if !strings.Contains(text, "MachineTypeController") {
			t.Errorf("controller-runtime log:\n%s", text)
		}
	})
	t.Run("a service beside the agent", func(t *testing.T) {
		if srv.BesideLog("kubelet") != nil {
			t.Error("a log for a service not beside the agent")
		}
		fmt.Fprintln(srv.BesideLog("apid"), "apid: serving on 127.0.0.11:50000")
		lines, err := logs(t, &machine.LogsRequest{Id: "apid", TailLines: 1})
		if err != nil || len(lines) != 1 || !bytes.Contains(lines[0], []byte("serving on")) {
			t.Errorf("apid tail 1: %q, %v", lines, err)
		}
	})
	t.Run("containers", func(t *testing.T) {
		_, err := logs(t, &machine.LogsRequest{Id: "kube-apiserver", Driver: common.ContainerDriver_CRI})
		nodetest.WantCode(t, err, codes.NotFound)
	})
	t.Run("follow", func(t *testing.T) {
		ctx, cancel := context.WithCancel(testkit.Context(t))
		defer cancel()
		stream, err := c.Logs(ctx, &machine.LogsRequest{Id: "agent", Follow: true})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Header(); err != nil { // the stream's start point is fixed
			t.Fatal(err)
		}
		if _, err := c.Reboot(ctx, &machine.RebootRequest{}); err != nil {
			t.Fatal(err)
		}
		d, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(d.GetBytes(), []byte("reboot requested")) {
			t.Fatalf("first followed line = %q", d.GetBytes())
		}
		cancel()
		_, err = nodetest.RecvAll(stream)
		nodetest.WantCode(t, err, codes.Canceled)
	})
}
