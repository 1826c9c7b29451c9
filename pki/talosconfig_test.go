package pki_test

import (
	"encoding/base64"
	"errors"
	"github.com/apid/apid/internal/testpki"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/pki"
	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
)

func talosContext(t *testing.T, endpoints ...string) pki.TalosContext {
	t.Helper()

	ca := testpki.NewCA(t, "cluster")
	certPEM, keyPEM, err := ca.IssueClient("admin", []string{certs.RoleAdmin}, time.Hour, pki.KeyEd25519)
	if err != nil {
		t.Fatal(err)
	}

	return pki.TalosContext{
		Endpoints: endpoints,
		Nodes:     []string{"10.0.0.2", "10.0.0.3"},
		CA:        ca.CertPEM,
		Crt:       certPEM,
		Key:       keyPEM,
	}
}

// checkContext checks that the Talos client reads c back from ctx.
func checkContext(t *testing.T, ctx *clientconfig.Context, c pki.TalosContext) {
	t.Helper()

	if ctx == nil {
		t.Fatal("context missing")
	}

	decode := func(s string) []byte {
		return testpki.Must[[]byte](t)(base64.StdEncoding.DecodeString(s))
	}

	if !slices.Equal(ctx.Endpoints, c.Endpoints) || !slices.Equal(ctx.Nodes, c.Nodes) {
		t.Errorf("endpoints %q nodes %q", ctx.Endpoints, ctx.Nodes)
	}

	if string(decode(ctx.CA)) != string(c.CA) || string(decode(ctx.Crt)) != string(c.Crt) || string(decode(ctx.Key)) != string(c.Key) {
		t.Error("ca/crt/key differ from the PEMs written")
	}

	// The Talos client loads the pair with tls.X509KeyPair.
	if _, err := client.CertificateFromConfigContext(ctx); err != nil {
		t.Errorf("Talos client cannot load the key pair: %v", err)
	}
}

func TestWriteTalosconfig(t *testing.T) {
	t.Parallel()

	path := filepath.Join(t.TempDir(), "talos", "config")
	first := talosContext(t, "10.0.0.1:50000")
	second := talosContext(t, "lb.example")

	if err := pki.WriteTalosconfig(path, "first", first, pki.TalosconfigCreate); err != nil {
		t.Fatal(err)
	}

	if info, err := os.Stat(path); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("stat: %v, %v", info, err)
	}

	cfg := testpki.Must[*clientconfig.Config](t)(clientconfig.Open(path))
	if cfg.Context != "first" || len(cfg.Contexts) != 1 {
		t.Fatalf("context %q, %d contexts", cfg.Context, len(cfg.Contexts))
	}

	checkContext(t, cfg.Contexts["first"], first)

	err := pki.WriteTalosconfig(path, "second", second, pki.TalosconfigCreate)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("create over an existing file: %v", err)
	}

	// Merging adds a context and makes it current.
	if err := pki.WriteTalosconfig(path, "second", second, pki.TalosconfigMerge); err != nil {
		t.Fatal(err)
	}

	cfg = testpki.Must[*clientconfig.Config](t)(clientconfig.Open(path))
	if cfg.Context != "second" || len(cfg.Contexts) != 2 {
		t.Fatalf("context %q, %d contexts", cfg.Context, len(cfg.Contexts))
	}

	checkContext(t, cfg.Contexts["first"], first)
	checkContext(t, cfg.Contexts["second"], second)

	// Merging a context of an existing name replaces it.
	replaced := talosContext(t, "10.0.0.9")
	if err := pki.WriteTalosconfig(path, "first", replaced, pki.TalosconfigMerge); err != nil {
		t.Fatal(err)
	}

	cfg = testpki.Must[*clientconfig.Config](t)(clientconfig.Open(path))
	if cfg.Context != "first" || len(cfg.Contexts) != 2 {
		t.Fatalf("context %q, %d contexts", cfg.Context, len(cfg.Contexts))
	}

	checkContext(t, cfg.Contexts["first"], replaced)
	checkContext(t, cfg.Contexts["second"], second)

	// Overwriting leaves only the new context.
	if err := pki.WriteTalosconfig(path, "only", first, pki.TalosconfigOverwrite); err != nil {
		t.Fatal(err)
	}

	cfg = testpki.Must[*clientconfig.Config](t)(clientconfig.Open(path))
	if cfg.Context != "only" || len(cfg.Contexts) != 1 {
		t.Fatalf("context %q, %d contexts", cfg.Context, len(cfg.Contexts))
	}
}

// TestMergeTalosconfigKeepsForeignContent merges into a file written by the
// Talos client itself, with fields apid does not know.
func TestMergeTalosconfigKeepsForeignContent(t *testing.T) {
	t.Parallel()

	path := filepath.Join(t.TempDir(), "config")
	foreign := &clientconfig.Config{
		Context: "omni",
		Contexts: map[string]*clientconfig.Context{
			"omni": {
				Endpoints: []string{"https://omni.example"},
				Cluster:   "prod",
				Auth:      clientconfig.Auth{SideroV1: &clientconfig.SideroV1{Identity: "alice@example.com"}},
			},
		},
	}

	if err := foreign.Save(path); err != nil {
		t.Fatal(err)
	}

	c := talosContext(t, "10.0.0.1")
	if err := pki.WriteTalosconfig(path, "apid", c, pki.TalosconfigMerge); err != nil {
		t.Fatal(err)
	}

	cfg := testpki.Must[*clientconfig.Config](t)(clientconfig.Open(path))
	if cfg.Context != "apid" {
		t.Errorf("current context %q", cfg.Context)
	}

	checkContext(t, cfg.Contexts["apid"], c)

	omni := cfg.Contexts["omni"]
	if omni == nil || omni.Cluster != "prod" || omni.Auth.SideroV1 == nil || omni.Auth.SideroV1.Identity != "alice@example.com" {
		t.Errorf("foreign context changed: %+v", omni)
	}

	// A file the Talos client created empty merges as well.
	empty := filepath.Join(t.TempDir(), "empty")
	testpki.Must[*clientconfig.Config](t)(clientconfig.Open(empty))

	if err := pki.WriteTalosconfig(empty, "apid", c, pki.TalosconfigMerge); err != nil {
		t.Fatal(err)
	}

	cfg = testpki.Must[*clientconfig.Config](t)(clientconfig.Open(empty))
	checkContext(t, cfg.Contexts["apid"], c)
}

func TestWriteTalosconfigRejects(t *testing.T) {
	t.Parallel()

	dir := t.TempDir()
	good := talosContext(t, "10.0.0.1")
	other := talosContext(t, "10.0.0.1")

	noEndpoints := good
	noEndpoints.Endpoints = nil

	mismatched := good
	mismatched.Key = other.Key

	noCA := good
	noCA.CA = nil

	for name, c := range map[string]pki.TalosContext{
		"no endpoints":   noEndpoints,
		"mismatched key": mismatched,
		"no CA":          noCA,
	} {
		if err := pki.WriteTalosconfig(filepath.Join(dir, name), "x", c, pki.TalosconfigCreate); err == nil {
			t.Errorf("%s: written", name)
		}
	}

	if err := pki.WriteTalosconfig(filepath.Join(dir, "unnamed"), "", good, pki.TalosconfigCreate); err == nil {
		t.Error("empty context name accepted")
	}

	notTalos := filepath.Join(dir, "list.yaml")
	if err := os.WriteFile(notTalos, []byte("- a\n- b\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	if err := pki.WriteTalosconfig(notTalos, "x", good, pki.TalosconfigMerge); err == nil {
		t.Error("merged into a YAML list")
	}
}

func TestWriteTalosconfigMergeThroughSymlink(t *testing.T) {
	t.Parallel()

	dir := t.TempDir()
	real, link := filepath.Join(dir, "real"), filepath.Join(dir, "link")
	first, second := talosContext(t, "10.0.0.1"), talosContext(t, "10.0.0.2")

	if err := pki.WriteTalosconfig(real, "first", first, pki.TalosconfigCreate); err != nil {
		t.Fatal(err)
	}

	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}

	if err := pki.WriteTalosconfig(link, "second", second, pki.TalosconfigMerge); err != nil {
		t.Fatal(err)
	}

	if info, err := os.Lstat(link); err != nil || info.Mode()&fs.ModeSymlink == 0 {
		t.Fatalf("symlink replaced: %v, %v", info, err)
	}

	cfg := testpki.Must[*clientconfig.Config](t)(clientconfig.Open(real))
	checkContext(t, cfg.Contexts["first"], first)
	checkContext(t, cfg.Contexts["second"], second)
}

// talosReads reports whether the Talos client loads b, which it does not
// always survive.
func talosReads(b []byte) (ok bool) {
	defer func() {
		if recover() != nil {
			ok = false
		}
	}()

	_, err := clientconfig.FromBytes(b)

	return err == nil
}

// FuzzMergeTalosconfig merges into arbitrary YAML: it must not panic, and
// when it accepts a file the Talos client could read, the client must read
// the output too, with the merged context current. Refusing is always safe
// (yaml.v3 and the client's yaml v4 disagree on some odd syntax).
func FuzzMergeTalosconfig(f *testing.F) {
	for _, seed := range []string{
		"",
		"null\n",
		"context: \"\"\ncontexts: {}\n",
		"context: a\ncontexts:\n  a:\n    endpoints: [x]\n    auth: {basic: {username: u, password: p}}\n",
		"contexts: 3\n",
		"- a\n",
		"a: &x {b: 1}\ncontexts: *x\n",
		"context: a\ncontext: b\n",
	} {
		f.Add([]byte(seed))
	}

	c := pki.TalosContext{Endpoints: []string{"10.0.0.1"}, CA: []byte("ca"), Crt: []byte("crt"), Key: []byte("key")}

	f.Fuzz(func(t *testing.T, existing []byte) {
		out, err := pki.MergeTalosconfig(existing, "apid", c)
		if err != nil || len(existing) != 0 && !talosReads(existing) {
			return
		}

		cfg, err := clientconfig.FromBytes(out)
		if err != nil {
			t.Fatalf("merged output does not parse: %v\n%s", err, out)
		}

		if cfg.Context != "apid" || cfg.Contexts["apid"] == nil || cfg.Contexts["apid"].Crt != "Y3J0" {
			t.Fatalf("merged context is not current or not stored:\n%s", out)
		}
	})
}
