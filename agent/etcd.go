package agent

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"strconv"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Trailer keys set by EtcdRecover to describe the upload it received.
const (
	// TrailerReceivedBytes holds the number of bytes received, in decimal.
	TrailerReceivedBytes = "x-received-bytes"
	// TrailerReceivedSHA256 holds the hex SHA-256 of the bytes received.
	TrailerReceivedSHA256 = "x-received-sha256"
)

// EtcdRecover accepts an uploaded snapshot, keeps nothing of it but its size
// and digest, and reports both in the response trailer so that a caller can
// check that a proxy passed the upload through unchanged.
func (s *Server) EtcdRecover(stream grpc.ClientStreamingServer[common.Data, machine.EtcdRecoverResponse]) (err error) {
	h := sha256.New()
	var n int64
	for {
		chunk, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		h.Write(chunk.GetBytes())
		n += int64(len(chunk.GetBytes()))
	}
	sum := hex.EncodeToString(h.Sum(nil))
	stream.SetTrailer(metadata.Pairs(
		TrailerReceivedBytes, strconv.FormatInt(n, 10),
		TrailerReceivedSHA256, sum,
	))
	s.log.Info("etcd snapshot received; example agent discards it", "bytes", n, "sha256", sum)
	return stream.SendAndClose(&machine.EtcdRecoverResponse{Messages: []*machine.EtcdRecover{{}}})
}
