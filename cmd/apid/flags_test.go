package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestConfigFileAndFlags(t *testing.T) {
	file := filepath.Join(t.TempDir(), "apid.yaml")
	yaml := `
listen: 127.0.0.1:6000
ca: /etc/ca.crt
cert: /etc/node.crt
key: /etc/node.key
backend: unix:///run/agent.sock
nodeTimeout: 3s
selfNames: [10.0.0.2]
maxConnectionIdle: 90s
limits:
  bufferedBytes: 2GiB
  streamWindow: 512KiB
  connectionsPerIdentity: 8
policy:
  rules:
    - method: /custom.Svc/*
      roles: [os:reader]
`
	if err := os.WriteFile(file, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig("serve", []string{"-config", file, "-node-timeout", "5s", "-self", "cp-1"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:6000" || cfg.Backend != "unix:///run/agent.sock" || cfg.Nodes.Port != 50000 {
		t.Errorf("file values or defaults lost: %+v", cfg)
	}
	if cfg.Routing.NodeTimeout != 5*time.Second {
		t.Errorf("flag did not override the file: nodeTimeout %v", cfg.Routing.NodeTimeout)
	}
	if strings.Join(cfg.Routing.SelfNames, ",") != "10.0.0.2,cp-1" {
		t.Errorf("selfNames %v", cfg.Routing.SelfNames)
	}
	if len(cfg.Policy.Rules) != 1 {
		t.Errorf("policy %+v", cfg.Policy)
	}
	l := cfg.Limits
	if cfg.MaxConnectionIdle != 90*time.Second || l.BufferedBytes != 2<<30 || l.StreamWindow != 512<<10 ||
		l.ConnectionsPerIdentity != 8 || l.Connections != 4096 || l.NodeBuffer != 64<<10 {
		t.Errorf("limits from the file or their defaults lost: %v %+v", cfg.MaxConnectionIdle, l)
	}
}
