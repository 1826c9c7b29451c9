package main

import (
	"errors"
	"flag"
	"fmt"
	"github.com/apid/apid/pki"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

const genUsage = `usage:
  apid gen ca     [-out DIR] [-name CN] [-ttl D] [-key-type ecdsa|ed25519] [-force]
  apid gen node   -name FQDN [-ip IP,...] [-dns NAME,...] [-ca-dir DIR] [-out DIR] [-ttl D] [-force]
  apid gen client -name CN -roles os:reader[,...] [-ttl D] [-ca-dir DIR] [-out DIR] [-force]
                  [-talosconfig FILE -endpoints A,B [-nodes A,B] [-context NAME]]

Private keys are written with mode 0600; existing files are kept unless -force.
`

func runGen(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, genUsage)
		return errors.New("gen: what to generate? ca, node or client")
	}
	what, args := args[0], args[1:]
	fs := flag.NewFlagSet("gen "+what, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, genUsage); fs.PrintDefaults() }
	out := fs.String("out", ".", "output `directory`")
	caDir := fs.String("ca-dir", ".", "`directory` holding ca.crt and ca.key")
	name := fs.String("name", "", "common name (node: its FQDN; client: who it is)")
	ttl := fs.Duration("ttl", 365*24*time.Hour, "validity")
	keyType := fs.String("key-type", "ecdsa", "ecdsa (P-256) or ed25519")
	force := fs.Bool("force", false, "overwrite existing files")
	ips := fs.String("ip", "", "node: comma-separated IP SANs")
	dns := fs.String("dns", "", "node: comma-separated DNS SANs (the name is always one)")
	roles := fs.String("roles", "", "client: comma-separated roles, e.g. os:reader")
	talosconfig := fs.String("talosconfig", "", "client: also write (or merge into) this talosconfig `file`")
	endpoints := fs.String("endpoints", "", "client: talosconfig endpoints, comma-separated")
	nodes := fs.String("nodes", "", "client: talosconfig default nodes, comma-separated")
	contextName := fs.String("context", "", "client: talosconfig context name (default: the name)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	kt, err := pki.ParseKeyType(*keyType)
	if err != nil {
		return fmt.Errorf("-key-type: %w", err)
	}
	if *ttl <= 0 {
		return fmt.Errorf("-ttl %s: must be positive", *ttl)
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	write := func(base string, crt, key []byte) error {
		crtPath, keyPath := filepath.Join(*out, base+".crt"), filepath.Join(*out, base+".key")
		for _, p := range []string{crtPath, keyPath} {
			if _, err := os.Stat(p); err == nil && !*force {
				return fmt.Errorf("%s exists (use -force to overwrite)", p)
			}
		}
		if err := pki.WriteFile(crtPath, crt, 0o644, *force); err != nil {
			return err
		}
		if err := pki.WriteFile(keyPath, key, 0o600, *force); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "wrote %s and %s\n", crtPath, keyPath)
		return nil
	}

	if what == "ca" {
		cn := *name
		if cn == "" {
			cn = "apid CA"
		}
		ca, err := pki.NewCA(cn, *ttl, kt)
		if err != nil {
			return err
		}
		return write("ca", ca.CertPEM, ca.KeyPEM)
	}

	if *name == "" {
		return fmt.Errorf("gen %s: -name is required", what)
	}
	ca, err := pki.ReadCA(filepath.Join(*caDir, "ca.crt"), filepath.Join(*caDir, "ca.key"))
	if err != nil {
		return err
	}
	switch what {
	case "node":
		var ipList []net.IP
		for _, s := range splitList(*ips) {
			ip := net.ParseIP(s)
			if ip == nil {
				return fmt.Errorf("-ip %q: not an IP address", s)
			}
			ipList = append(ipList, ip)
		}
		crt, key, err := ca.IssueNode(*name, append([]string{*name}, splitList(*dns)...), ipList, *ttl, kt)
		if err != nil {
			return err
		}
		return write(*name, crt, key)
	case "client":
		roleList := splitList(*roles)
		if len(roleList) == 0 {
			return errors.New("gen client: -roles is required (e.g. os:reader)")
		}
		crt, key, err := ca.IssueClient(*name, roleList, *ttl, kt)
		if err != nil {
			return err
		}
		if err := write(*name, crt, key); err != nil {
			return err
		}
		if *talosconfig == "" {
			return nil
		}
		if len(splitList(*endpoints)) == 0 {
			return errors.New("gen client: -talosconfig needs -endpoints")
		}
		ctxName := *contextName
		if ctxName == "" {
			ctxName = *name
		}
		tc := pki.TalosContext{Endpoints: splitList(*endpoints), Nodes: splitList(*nodes), CA: ca.CertPEM, Crt: crt, Key: key}
		if err := pki.WriteTalosconfig(*talosconfig, ctxName, tc, pki.TalosconfigMerge); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "wrote context %q to %s\n", ctxName, *talosconfig)
		return nil
	}
	fmt.Fprint(stderr, genUsage)
	return fmt.Errorf("gen: unknown kind %q", what)
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
