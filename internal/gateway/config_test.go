package gateway

import (
	"os"
	"strings"
	"testing"

	"github.com/apid/apid/auth"
)

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
	cfg := Default()
	cfg.Listen = "nonsense"
	cfg.Backend = "also nonsense"
	cfg.RemotePort = 0
	cfg.LogLevel = "loud"
	cfg.Limits.StreamWindow = 1024
	cfg.Limits.BufferedBytes = 0
	cfg.Policy.Rules = append(cfg.Policy.Rules, auth.Rule{Method: "no-slash", Roles: []string{"os:reader"}})
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
	cfg := Default()
	if err := Decode([]byte("lisen: :1\n"), &cfg); err == nil || !strings.Contains(err.Error(), "lisen") {
		t.Fatalf("typo in the file not reported: %v", err)
	}
}

func TestShippedConfigIsValid(t *testing.T) {
	cfg := Default()
	data, err := os.ReadFile("../../deploy/apid.yaml")
	if err == nil {
		err = Decode(data, &cfg)
	}
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		t.Fatalf("deploy/apid.yaml: %v", err)
	}
	if cfg.Listen != ":50000" || len(cfg.Policy.Rules) != 1 {
		t.Fatalf("deploy/apid.yaml read as %+v", cfg)
	}
}
