package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// runCmd runs apid with args in this process and returns its output.
func runCmd(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err = run(context.Background(), args, &out, &errOut)
	return out.String(), errOut.String(), err
}

func TestVersion(t *testing.T) {
	out, _, err := runCmd(t, "version")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"apid ", "commit ", "go " + runtime.Version()} {
		if !strings.Contains(out, want) {
			t.Errorf("version output %q lacks %q", out, want)
		}
	}
}

func TestGenHelp(t *testing.T) {
	out, _, err := runCmd(t, "gen", "-h")
	if err != nil {
		t.Fatalf("gen -h: %v", err)
	}
	for _, want := range []string{"gen ca", "gen node", "gen client", "load balancer"} {
		if !strings.Contains(out, want) {
			t.Errorf("gen -h lacks %q:\n%s", want, out)
		}
	}
	for _, kind := range []string{"ca", "node", "client"} {
		out, _, err := runCmd(t, "gen", kind, "-h")
		if !errors.Is(err, flag.ErrHelp) {
			t.Fatalf("gen %s -h: %v, want the usage (flag.ErrHelp, exit 0)", kind, err)
		}
		if !strings.Contains(out, "apid gen "+kind) || !strings.Contains(out, "-out") {
			t.Errorf("gen %s -h printed:\n%s", kind, out)
		}
	}
}

func TestGenClientRefusesUnknownRoles(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := runCmd(t, "gen", "ca", "-out", dir); err != nil {
		t.Fatal(err)
	}
	_, _, err := runCmd(t, "gen", "client", "-ca-dir", dir, "-out", dir, "-name", "typo", "-roles", "os:raeder")
	if err == nil || !strings.Contains(err.Error(), `unknown role "os:raeder"`) || !strings.Contains(err.Error(), "os:reader") {
		t.Fatalf("gen client with a misspelt role: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "typo.crt")); err == nil {
		t.Fatal("a certificate was written for a refused role")
	}
	if _, _, err := runCmd(t, "gen", "client", "-ca-dir", dir, "-out", dir, "-name", "ci", "-roles", "team:ci", "-allow-unknown-roles"); err != nil {
		t.Fatalf("an explicitly allowed custom role: %v", err)
	}
	if _, _, err := runCmd(t, "gen", "client", "-ca-dir", dir, "-out", dir, "-name", "sly", "-roles", "os:reader,os:impersonator"); err == nil ||
		!strings.Contains(err.Error(), "os:impersonator") {
		t.Fatalf("a client certificate that may claim any role: %v", err)
	}
	if _, _, err := runCmd(t, "gen", "client", "-ca-dir", dir, "-out", dir, "-name", "ops", "-roles", "os:operator,os:etcd:backup"); err != nil {
		t.Fatalf("built-in roles: %v", err)
	}
}

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"gen", "ca", "-out", dir},
		{"gen", "node", "-ca-dir", dir, "-out", dir, "-name", "cp-1", "-ip", "127.0.0.1"},
	} {
		if _, _, err := runCmd(t, args...); err != nil {
			t.Fatal(err)
		}
	}
	good := filepath.Join(dir, "good.yaml")
	writeFile(t, good, "ca: "+dir+"/ca.crt\ncert: "+dir+"/cp-1.crt\nkey: "+dir+"/cp-1.key\nclientCert: "+dir+"/cp-1-client.crt\nclientKey: "+dir+"/cp-1-client.key\nbackend: 127.0.0.1:1\n")
	out, _, err := runCmd(t, "check", "-config", good)
	if err != nil || !strings.Contains(out, "configuration is valid") {
		t.Fatalf("check of a good file: %v\n%s", err, out)
	}

	// Every problem at once: bad values and a key that is not the
	// certificate's.
	bad := filepath.Join(dir, "bad.yaml")
	nodes := filepath.Join(dir, "nodes.yaml")
	writeFile(t, nodes, "nodes:\n- {name: cp-2, role: master}\n")
	writeFile(t, bad, "ca: "+dir+"/ca.crt\ncert: "+dir+"/cp-1.crt\nkey: "+dir+"/ca.key\nlogLevel: loud\nadminListen: nowhere\n"+
		"inventory:\n  files: ["+nodes+"]\n  nodes: [{name: '@cp'}]\n  dns: [{name: _apid._tcp.example.org}]\n  dnsServer: 10.0.0.53\n")
	_, errOut, err := runCmd(t, "check", "-config", bad)
	if err == nil {
		t.Fatal("check of a bad file passed")
	}
	for _, want := range []string{"logLevel", "adminListen", "certificates:", `role "master"`, "cannot start with @", "inventory.dnsServer"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("check output lacks %q:\n%s", want, errOut)
		}
	}
	if _, _, err := runCmd(t, "check", "-config", filepath.Join(dir, "missing.yaml")); err == nil {
		t.Fatal("check of a missing file passed")
	}
	typo := filepath.Join(dir, "typo.yaml")
	writeFile(t, typo, "lisen: :1\n")
	if _, _, err := runCmd(t, "check", "-config", typo); err == nil || !strings.Contains(err.Error(), "lisen") {
		t.Fatalf("check of a misspelt key: %v", err)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestGatewayBuildLinksNoDemo: a build with -tags nodemo (make build, the
// deployment's) links neither the demo (its node, cluster and their parts)
// nor what the demo node serves from: the resource runtime and etcd's
// server. Only the COSI API's descriptors are linked, for the method table,
// and etcd's client, for the disruption budget shared through the
// cluster's etcd.
func TestGatewayBuildLinksNoDemo(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-tags", "nodemo", "github.com/apid/apid/cmd/apid").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		switch {
		case strings.HasPrefix(pkg, "github.com/apid/apid/internal/demo/"),
			strings.HasPrefix(pkg, "github.com/cosi-project/runtime/") && pkg != "github.com/cosi-project/runtime/api/v1alpha1",
			strings.HasPrefix(pkg, "go.etcd.io/") && !strings.HasPrefix(pkg, "go.etcd.io/etcd/client/") && !strings.HasPrefix(pkg, "go.etcd.io/etcd/api/"),
			strings.HasPrefix(pkg, "github.com/siderolabs/talos/pkg/machinery/resources"):
			t.Errorf("the gateway build links %s", pkg)
		}
	}
}
