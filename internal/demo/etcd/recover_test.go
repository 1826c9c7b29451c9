package etcd_test

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strconv"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/common"

	"github.com/apid/apid/internal/demo/etcd"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

func TestEtcdRecover(t *testing.T) {
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	stream, err := c.EtcdRecover(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	total := 0
	for i := range 5 {
		chunk := make([]byte, 10_000*i+1)
		_, _ = rand.Read(chunk)
		h.Write(chunk)
		total += len(chunk)
		if err := stream.Send(&common.Data{Bytes: chunk}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetMessages()) != 1 {
		t.Errorf("got %d messages, want 1", len(resp.GetMessages()))
	}
	tr := stream.Trailer()
	if got := tr.Get(etcd.TrailerReceivedBytes); !slices.Equal(got, []string{strconv.Itoa(total)}) {
		t.Errorf("%s = %q, want %d", etcd.TrailerReceivedBytes, got, total)
	}
	if got, want := tr.Get(etcd.TrailerReceivedSHA256), hex.EncodeToString(h.Sum(nil)); !slices.Equal(got, []string{want}) {
		t.Errorf("%s = %q, want %s", etcd.TrailerReceivedSHA256, got, want)
	}
}
