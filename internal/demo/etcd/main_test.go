package etcd_test

import (
	"testing"

	"github.com/apid/apid/internal/demo/nodetest"
)

func TestMain(m *testing.M) { nodetest.Main(m) }
