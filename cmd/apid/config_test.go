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
}

func TestConfigValidateListsEveryProblem(t *testing.T) {
	cfg := defaultConfig()
	cfg.Listen = "nonsense"
	cfg.Backend = "also nonsense"
	cfg.RemotePort = 0
	cfg.LogLevel = "loud"
	cfg.Policy.Rules = append(cfg.Policy.Rules, director.Rule{Method: "no-slash", Roles: []string{"os:reader"}})
	err := cfg.Validate()
	if err == nil {
		t.Fatal("invalid configuration accepted")
	}
	for _, want := range []string{"listen", "ca:", "cert:", "key:", "backend", "remotePort", "logLevel", "no-slash"} {
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
