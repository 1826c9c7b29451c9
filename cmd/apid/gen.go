package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/pki"
)

// genUsages are the synopses of apid gen's kinds.
var genUsages = map[string]string{
	"ca":     "apid gen ca     [-out DIR] [-name CN] [-ttl D] [-key-type ecdsa|ed25519] [-force]",
	"node":   "apid gen node   -name FQDN [-ip IP,...] [-dns NAME,...] [-ca-dir DIR] [-out DIR] [-ttl D] [-force]",
	"client": "apid gen client -name CN -roles os:reader[,...] [-allow-unknown-roles] [-allow-impersonator] [-ttl D] [-ca-dir DIR] [-out DIR] [-force]\n                [-talosconfig FILE -endpoints A,B [-nodes A,B] [-context NAME]]",
}

const genNotes = `
A node certificate must carry every name and address clients use to reach
the node, the load balancer's included (-dns lb.example.internal, -ip ...).
gen node also writes NAME-client.crt/.key, the identity the node forwards
with (os:impersonator, extended key usage clientAuth only, as Talos wants).
Private keys are written with mode 0600; existing files are kept unless -force.
`

func printGenUsage(w io.Writer, kinds ...string) {
	fmt.Fprintln(w, "usage:")
	for _, k := range kinds {
		fmt.Fprintln(w, "  "+genUsages[k])
	}
	fmt.Fprint(w, genNotes)
}

func runGen(args []string, stdout, stderr io.Writer) error {
	all := []string{"ca", "node", "client"}
	if len(args) == 0 {
		printGenUsage(stderr, all...)
		return errors.New("gen: what to generate? ca, node or client")
	}
	what, args := args[0], args[1:]
	switch what {
	case "-h", "-help", "--help", "help":
		printGenUsage(stdout, all...)
		return nil
	case "ca", "node", "client":
	default:
		printGenUsage(stderr, all...)
		return fmt.Errorf("gen: unknown kind %q: want ca, node or client", what)
	}
	fs := flag.NewFlagSet("gen "+what, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		printGenUsage(fs.Output(), what)
		fmt.Fprintln(fs.Output(), "\nflags:")
		fs.PrintDefaults()
	}
	// Each kind has the flags it uses and no other, so a flag given to
	// the wrong kind is an error rather than silently ignored.
	var (
		caDir, ips, dns, roles, talosconfig, endpoints, nodes, contextName string
		allowUnknown, allowImpersonator                                    bool
	)
	out := fs.String("out", ".", "output `directory`")
	name := fs.String("name", "", "common name (ca: its name; node: its FQDN; client: who it is)")
	ttl := fs.Duration("ttl", 365*24*time.Hour, "validity")
	keyType := fs.String("key-type", "ecdsa", "ecdsa (P-256) or ed25519")
	force := fs.Bool("force", false, "overwrite existing files")
	if what != "ca" {
		fs.StringVar(&caDir, "ca-dir", ".", "`directory` holding ca.crt and ca.key")
	}
	if what == "node" {
		fs.StringVar(&ips, "ip", "", "comma-separated IP SANs")
		fs.StringVar(&dns, "dns", "", "comma-separated DNS SANs (the name is always one)")
	}
	if what == "client" {
		fs.StringVar(&roles, "roles", "", "comma-separated roles, e.g. os:reader")
		fs.BoolVar(&allowUnknown, "allow-unknown-roles", false, "accept roles outside the built-in ones (for a custom policy)")
		fs.BoolVar(&allowImpersonator, "allow-impersonator", false, "accept os:impersonator, which lets the holder claim any role (forwarding identities carry it)")
		fs.StringVar(&talosconfig, "talosconfig", "", "also write (or merge into) this talosconfig `file`")
		fs.StringVar(&endpoints, "endpoints", "", "talosconfig endpoints, comma-separated")
		fs.StringVar(&nodes, "nodes", "", "talosconfig default nodes, comma-separated")
		fs.StringVar(&contextName, "context", "", "talosconfig context name (default: the name)")
	}
	for _, a := range args {
		if a == "-h" || a == "-help" || a == "--help" {
			fs.SetOutput(stdout) // asked for: the usage is the output
		}
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("gen %s takes flags only; unexpected argument %q", what, fs.Arg(0))
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
	ca, err := pki.ReadCA(filepath.Join(caDir, "ca.crt"), filepath.Join(caDir, "ca.key"))
	if err != nil {
		return err
	}
	switch what {
	case "node":
		var ipList []net.IP
		for _, s := range splitList(ips) {
			ip := net.ParseIP(s)
			if ip == nil {
				return fmt.Errorf("-ip %q: not an IP address", s)
			}
			ipList = append(ipList, ip)
		}
		crt, key, err := ca.IssueNode(*name, append([]string{*name}, splitList(dns)...), ipList, *ttl, kt)
		if err != nil {
			return err
		}
		if err := write(*name, crt, key); err != nil {
			return err
		}
		// The forwarding identity, as Talos control planes hold it.
		crt, key, err = ca.IssueForwarding(*name, *ttl, kt)
		if err != nil {
			return err
		}
		if err := write(*name+"-client", crt, key); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "serve with cert/key = %[1]s.crt/.key and clientCert/clientKey = %[1]s-client.crt/.key\n", filepath.Join(*out, *name))
		return nil
	case "client":
		roleList := splitList(roles)
		if len(roleList) == 0 {
			return errors.New("gen client: -roles is required (e.g. os:reader)")
		}
		if slices.Contains(roleList, certs.RoleImpersonator) && !allowImpersonator {
			return fmt.Errorf("gen client: %s lets the holder assert any role, os:admin included; it belongs on node certificates (use -allow-impersonator if you mean it)", certs.RoleImpersonator)
		}
		if !allowUnknown {
			for _, r := range roleList {
				if !slices.Contains(certs.BuiltinRoles, r) {
					return fmt.Errorf("gen client: unknown role %q: the built-in roles are %s (use -allow-unknown-roles for a role of your own policy)",
						r, strings.Join(certs.BuiltinRoles, ", "))
				}
			}
		}
		crt, key, err := ca.IssueClient(*name, roleList, *ttl, kt)
		if err != nil {
			return err
		}
		if err := write(*name, crt, key); err != nil {
			return err
		}
		if talosconfig == "" {
			return nil
		}
		if len(splitList(endpoints)) == 0 {
			return errors.New("gen client: -talosconfig needs -endpoints")
		}
		ctxName := contextName
		if ctxName == "" {
			ctxName = *name
		}
		tc := pki.TalosContext{Endpoints: splitList(endpoints), Nodes: splitList(nodes), CA: ca.CertPEM, Crt: crt, Key: key}
		if err := pki.WriteTalosconfig(talosconfig, ctxName, tc, pki.TalosconfigMerge); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "wrote context %q to %s\n", ctxName, talosconfig)
		return nil
	}
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
