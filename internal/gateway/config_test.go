package gateway

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/apid/apid/auth"
)

func TestConfigValidateListsEveryProblem(t *testing.T) {
	cfg := Default()
	cfg.Listen = "nonsense"
	cfg.Backend = "also nonsense"
	cfg.Nodes.Port = 0
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

// TestEveryKeyHasAReloadRule: a key without a reload tag would need a
// restart silently; every key says which it is, beside its field.
func TestEveryKeyHasAReloadRule(t *testing.T) {
	keys := 0
	walkKeys(reflect.TypeFor[Config](), "", func(key string, _ []int, rule string) {
		keys++
		if rule != "live" && rule != "restart" {
			t.Errorf("key %s has reload rule %q: want live or restart on its field", key, rule)
		}
	})
	if keys < 40 {
		t.Fatalf("walked %d keys: the walk misses sections", keys)
	}
}

// TestReloadAppliesLiveKeysOnly: a live key changes; a restart key keeps
// its running value and is reported.
func TestReloadAppliesLiveKeysOnly(t *testing.T) {
	cur := Default()
	next := Default()
	next.Routing.MaxNodes = 7
	next.Limits.ConcurrentCallsPerIdentity = 9
	next.Limits.StreamWindow = 1 << 20
	next.Listen = ":1"
	live, restart := reconcile(cur, &next)
	if strings.Join(live, ",") != "maxNodes,limits.concurrentCallsPerIdentity" {
		t.Errorf("live %v", live)
	}
	if strings.Join(restart, ",") != "listen,limits.streamWindow" {
		t.Errorf("restart %v", restart)
	}
	if next.Listen != cur.Listen || next.Limits.StreamWindow != cur.Limits.StreamWindow || next.Routing.MaxNodes != 7 {
		t.Errorf("next after reconcile: listen %q, streamWindow %d, maxNodes %d", next.Listen, next.Limits.StreamWindow, next.Routing.MaxNodes)
	}
}

// TestConfigTyposNameThePathAndTheKeyMeant: a typo anywhere reads as the
// full key path, its line, and the nearest valid key.
func TestConfigTyposNameThePathAndTheKeyMeant(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{"lisen: :1\n", "line 1: lisen is not a configuration key: did you mean listen?"},
		{"limits:\n  bufferdBytes: 1MiB\n", "line 2: limits.bufferdBytes is not a configuration key: did you mean limits.bufferedBytes?"},
		{"bufferedBytes: 1MiB\n", "line 1: bufferedBytes is not a configuration key: did you mean limits.bufferedBytes?"},
		{"inventory:\n  nodes:\n    - {name: a, adress: 127.0.0.2}\n", "inventory.nodes[0].adress is not a configuration key: did you mean inventory.nodes[0].address?"},
		{"ejection:\n  maxpercent: 3\n", "ejection.maxpercent is not a configuration key: did you mean ejection.maxPercent?"},
		{"nodetimeout: 1s\n", "did you mean nodeTimeout?"},
		{"tracing:\n  zzz: 1\n", "line 2: tracing.zzz is not a configuration key"},
	} {
		cfg := Default()
		err := Decode([]byte(tc.doc), &cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v\nwant %q", tc.doc, err, tc.want)
		}
	}
	cfg := Default()
	if err := Decode([]byte("limits:\n  bufferedBytes: 2MiB\ninventory:\n  nodes:\n    - {name: a, address: 127.0.0.2, labels: {zone: x}}\n"), &cfg); err != nil {
		t.Fatalf("valid document refused: %v", err)
	}
}

// TestConfigProblemsOneLineEach: every problem is one line that starts
// with its key's full path.
func TestConfigProblemsOneLineEach(t *testing.T) {
	cfg := Default()
	cfg.Nodes.MaxConns = 0
	cfg.Nodes.MaxDials = -1
	cfg.Routing.Ejection.MaxPercent = 101
	cfg.Limits.ConnectionsPerIdentity = 0
	cfg.Health.MaxRunning = 0
	err := cfg.Validate()
	if err == nil {
		t.Fatal("accepted")
	}
	lines := strings.Split(err.Error(), "\n")
	want := []string{"ca:", "cert:", "key:", "ejection.maxPercent", "maxConnections", "maxDials", "limits.connectionsPerIdentity", "health.maxRunning"}
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d:\n%v", len(lines), len(want), err)
	}
	for i, w := range want {
		if !strings.HasPrefix(lines[i], w) {
			t.Errorf("line %d %q: want it to start with %q", i, lines[i], w)
		}
	}
}

// TestAdminListenStaysOnLoopback: the admin endpoint has no
// authentication, so another address needs an explicit opt-in.
func TestAdminListenStaysOnLoopback(t *testing.T) {
	cfg := Default()
	cfg.TLS.CA, cfg.TLS.Cert, cfg.TLS.Key = "ca", "cert", "key"
	for addr, ok := range map[string]bool{"127.0.0.1:50001": true, "[::1]:50001": true, "localhost:50001": true, "0.0.0.0:50001": false, ":50001": false, "198.18.0.1:50001": false} {
		cfg.AdminListen = addr
		err := cfg.Validate()
		if (err == nil) != ok {
			t.Errorf("adminListen %s: %v", addr, err)
		}
		if !ok && !strings.Contains(fmt.Sprint(err), "adminPublic: true") {
			t.Errorf("adminListen %s: %v, want the opt-in named", addr, err)
		}
	}
	cfg.AdminListen, cfg.AdminPublic = "0.0.0.0:50001", true
	if err := cfg.Validate(); err != nil {
		t.Errorf("adminPublic: %v", err)
	}
}

// TestKeyWithoutValueRefused: a key written with no value (a file cut
// inside a value, as a writer that dies leaves it) is an error naming it,
// not its zero value: localOnly: would otherwise turn forwarding back on.
func TestKeyWithoutValueRefused(t *testing.T) {
	for doc, want := range map[string][]string{
		"localOnly: true\nlogLevel: info\nlocalOnly2: 1\n":      {"localOnly2 is not a configuration key"},
		"logLevel: info\nlocalOnly:\n":                          {"line 2: localOnly has no value"},
		"nodeNetworks:\nlimits:\n  connections:\n":              {"line 1: nodeNetworks has no value", "line 3: limits.connections has no value"},
		"inventory:\n  nodes:\n    - name: a\n      address:\n": {"line 4: inventory.nodes[0].address has no value"},
	} {
		cfg := Default()
		err := Decode([]byte(doc), &cfg)
		for _, w := range want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("%q: %v, want %q", doc, err, w)
			}
		}
	}
	cfg := Default()
	if err := Decode([]byte("localOnly: true\nnodeNetworks: []\n"), &cfg); err != nil || !cfg.Routing.LocalOnly {
		t.Errorf("a complete file: %v", err)
	}
}

// TestTypeErrorsNameTheirKeys: a value of the wrong type is reported with
// its line and key and how to write it, every one at once; the rest of
// the file is decoded, so validation can report its problems in the same
// run.
func TestTypeErrorsNameTheirKeys(t *testing.T) {
	doc := "logLevel: info\nnodeTimeout: 30\nmaxNodes: many\nlocalOnly: perhaps\nlogFormat: txt\nlimits:\n  bufferedBytes: lots\n"
	cfg := Default()
	err := Decode([]byte(doc), &cfg)
	var de *DecodeError
	if !errors.As(err, &de) {
		t.Fatalf("%v: want a DecodeError", err)
	}
	for _, w := range []string{
		"line 2: nodeTimeout: 30 is not a duration: write 30s",
		"line 3: maxNodes: many is not a whole number",
		"line 4: localOnly: perhaps is not true or false",
	} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("no %q in:\n%v", w, err)
		}
	}
	if cfg.LogFormat != "txt" {
		t.Errorf("the keys around the bad values were not decoded: logFormat %q", cfg.LogFormat)
	}
	// A custom type's error (a size) is named by its key too.
	cfg = Default()
	err = Decode([]byte("limits:\n  bufferedBytes: lots\n"), &cfg)
	if err == nil || !strings.Contains(err.Error(), "line 2: limits.bufferedBytes:") {
		t.Errorf("a bad size: %v", err)
	}
}

// TestRenamedKeySaysWhatToRename: a key of an earlier version is refused
// naming what it became.
func TestRenamedKeySaysWhatToRename(t *testing.T) {
	cfg := Default()
	err := Decode([]byte("logLevel: info\nmetricsListen: 127.0.0.1:9100\n"), &cfg)
	if err == nil || !strings.Contains(err.Error(), "line 2: metricsListen is not a configuration key: it was renamed adminListen") || !strings.Contains(err.Error(), "rename it") {
		t.Errorf("metricsListen: %v", err)
	}
}
