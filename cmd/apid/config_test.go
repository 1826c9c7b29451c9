package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/apid/apid/director"
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
	cfg, err := loadConfig([]string{"-config", file, "-node-timeout", "5s", "-self", "cp-1"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:6000" || cfg.Backend != "unix:///run/agent.sock" || cfg.RemotePort != 50000 {
		t.Errorf("file values or defaults lost: %+v", cfg)
	}
	if cfg.NodeTimeout != 5*time.Second {
		t.Errorf("flag did not override the file: nodeTimeout %v", cfg.NodeTimeout)
	}
	if strings.Join(cfg.SelfNames, ",") != "10.0.0.2,cp-1" {
		t.Errorf("selfNames %v", cfg.SelfNames)
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

func TestByteSizes(t *testing.T) {
	for in, want := range map[string]ByteSize{"0": 0, "1024": 1024, "64KiB": 64 << 10, "1 MiB": 1 << 20, "3GiB": 3 << 30, "12B": 12} {
		if got, err := parseByteSize(in); err != nil || got != want {
			t.Errorf("%q: %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "1.5MiB", "12kb", "MiB", "99999999999GiB"} {
		if _, err := parseByteSize(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

func TestConfigValidateListsEveryProblem(t *testing.T) {
	cfg := defaultConfig()
	cfg.Listen = "nonsense"
	cfg.Backend = "also nonsense"
	cfg.RemotePort = 0
	cfg.LogLevel = "loud"
	cfg.Limits.StreamWindow = 1024
	cfg.Limits.BufferedBytes = 0
	cfg.Policy.Rules = append(cfg.Policy.Rules, director.Rule{Method: "no-slash", Roles: []string{"os:reader"}})
	err := cfg.Validate()
	if err == nil {
		t.Fatal("invalid configuration accepted")
	}
	for _, want := range []string{"listen", "ca:", "cert:", "key:", "backend", "remotePort", "logLevel", "no-slash", "limits.streamWindow", "limits.bufferedBytes"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
}

func TestConfigRejectsUnknownKeys(t *testing.T) {
	file := filepath.Join(t.TempDir(), "apid.yaml")
	if err := os.WriteFile(file, []byte("lisen: :1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadConfig([]string{"-config", file}, io.Discard); err == nil || !strings.Contains(err.Error(), "lisen") {
		t.Fatalf("typo in the file not reported: %v", err)
	}
}

func TestShippedConfigIsValid(t *testing.T) {
	cfg, err := loadConfig([]string{"-config", "../../deploy/apid.yaml"}, io.Discard)
	if err != nil {
		t.Fatalf("deploy/apid.yaml: %v", err)
	}
	if cfg.Listen != ":50000" || len(cfg.Policy.Rules) != 1 {
		t.Fatalf("deploy/apid.yaml read as %+v", cfg)
	}
}
