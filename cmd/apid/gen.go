package main

import (
	"cmp"
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

// genKinds are apid gen's kinds. Each adds the flags it uses, and no other
// (so that a flag given to the wrong kind is an error rather than silently
// ignored), and returns what makes it once they are parsed.
var genKinds = map[string]func(*flag.FlagSet) func(*gen) error{"ca": genCA, "node": genNode, "client": genClient}

// gen is what a kind is given: the common flags, parsed.
type gen struct {
	stdout  io.Writer
	name    string
	ttl     time.Duration
	keyType pki.KeyType
	out     pki.Dir // -out and -force
	ca      *pki.CA // read from -ca-dir (node and client)
}

func runGen(args []string, stdout, stderr io.Writer) error {
	all := []string{"ca", "node", "client"}
	if len(args) == 0 {
		printGenUsage(stderr, all...)
		return errors.New("gen: what to generate? ca, node or client")
	}
	what, args := args[0], args[1:]
	kind, ok := genKinds[what]
	if slices.Contains([]string{"-h", "-help", "--help", "help"}, what) {
		printGenUsage(stdout, all...)
		return nil
	} else if !ok {
		printGenUsage(stderr, all...)
		return fmt.Errorf("gen: unknown kind %q: want ca, node or client", what)
	}
	fs := flag.NewFlagSet("gen "+what, flag.ContinueOnError)
	fs.SetOutput(stderr)
	if slices.ContainsFunc(args, func(a string) bool { return a == "-h" || a == "-help" || a == "--help" }) {
		fs.SetOutput(stdout) // asked for: the usage is the output
	}
	fs.Usage = func() {
		printGenUsage(fs.Output(), what)
		fmt.Fprintln(fs.Output(), "\nflags:")
		fs.PrintDefaults()
	}
	g := &gen{stdout: stdout, out: pki.Dir{Wrote: func(crt, key string) { fmt.Fprintf(stdout, "wrote %s and %s\n", crt, key) }}}
	fs.StringVar(&g.out.Path, "out", ".", "output `directory`")
	fs.StringVar(&g.name, "name", "", "common name (ca: its name; node: its FQDN; client: who it is)")
	fs.DurationVar(&g.ttl, "ttl", 365*24*time.Hour, "validity")
	keyType := fs.String("key-type", "ecdsa", "ecdsa (P-256) or ed25519")
	fs.BoolVar(&g.out.Force, "force", false, "overwrite existing files")
	var caDir pki.Dir
	if what != "ca" {
		fs.StringVar(&caDir.Path, "ca-dir", ".", "`directory` holding ca.crt and ca.key")
	}
	run := kind(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	var err error
	switch g.keyType, err = pki.ParseKeyType(*keyType); {
	case fs.NArg() > 0:
		return fmt.Errorf("gen %s takes flags only; unexpected argument %q", what, fs.Arg(0))
	case err != nil:
		return fmt.Errorf("-key-type: %w", err)
	case g.ttl <= 0:
		return fmt.Errorf("-ttl %s: must be positive", g.ttl)
	}
	if err := os.MkdirAll(g.out.Path, 0o755); err != nil {
		return err
	}
	if what != "ca" && g.name == "" {
		return fmt.Errorf("gen %s: -name is required", what)
	} else if what != "ca" {
		if g.ca, err = caDir.ReadCA(); err != nil {
			return err
		}
	}
	if err = run(g); errors.As(err, new(*pki.ExistsError)) {
		err = fmt.Errorf("%w (use -force to overwrite)", err)
	}
	return err
}

// genCA makes a CA.
func genCA(*flag.FlagSet) func(*gen) error {
	return func(g *gen) error {
		ca, err := pki.NewCA(cmp.Or(g.name, "apid CA"), g.ttl, g.keyType)
		if err != nil {
			return err
		}
		_, _, err = g.out.WritePair("ca", ca.CertPEM, ca.KeyPEM)
		return err
	}
}

// genNode makes a node's serving certificate and the identity it forwards
// with, as Talos control planes hold it.
func genNode(fs *flag.FlagSet) func(*gen) error {
	ips := fs.String("ip", "", "comma-separated IP SANs")
	dns := fs.String("dns", "", "comma-separated DNS SANs (the name is always one)")
	return func(g *gen) error {
		var ipList []net.IP
		for _, s := range splitList(*ips) {
			ip := net.ParseIP(s)
			if ip == nil {
				return fmt.Errorf("-ip %q: not an IP address", s)
			}
			ipList = append(ipList, ip)
		}
		if _, err := g.out.WriteNode(g.ca, g.name, append([]string{g.name}, splitList(*dns)...), ipList, g.ttl, g.keyType); err != nil {
			return err
		}
		fmt.Fprintf(g.stdout, "serve with cert/key = %[1]s.crt/.key and clientCert/clientKey = %[1]s-client.crt/.key\n", filepath.Join(g.out.Path, g.name))
		return nil
	}
}

// genClient makes a client certificate with roles and, with -talosconfig,
// a context for it in that talosconfig.
func genClient(fs *flag.FlagSet) func(*gen) error {
	roles := fs.String("roles", "", "comma-separated roles, e.g. os:reader")
	allowUnknown := fs.Bool("allow-unknown-roles", false, "accept roles outside the built-in ones (for a custom policy)")
	allowImpersonator := fs.Bool("allow-impersonator", false, "accept os:impersonator, which lets the holder claim any role (forwarding identities carry it)")
	talosconfig := fs.String("talosconfig", "", "also write (or merge into) this talosconfig `file`")
	endpoints := fs.String("endpoints", "", "talosconfig endpoints, comma-separated")
	nodes := fs.String("nodes", "", "talosconfig default nodes, comma-separated")
	contextName := fs.String("context", "", "talosconfig context name (default: the name)")
	return func(g *gen) error {
		roleList := splitList(*roles)
		switch unknown := slices.IndexFunc(roleList, func(r string) bool { return !slices.Contains(certs.BuiltinRoles, r) }); {
		case len(roleList) == 0:
			return errors.New("gen client: -roles is required (e.g. os:reader)")
		case slices.Contains(roleList, certs.RoleImpersonator) && !*allowImpersonator:
			return fmt.Errorf("gen client: %s lets the holder assert any role, os:admin included; it belongs on node certificates (use -allow-impersonator if you mean it)", certs.RoleImpersonator)
		case unknown >= 0 && !*allowUnknown:
			return fmt.Errorf("gen client: unknown role %q: the built-in roles are %s (use -allow-unknown-roles for a role of your own policy)",
				roleList[unknown], strings.Join(certs.BuiltinRoles, ", "))
		}
		crt, key, err := g.ca.IssueClient(g.name, roleList, g.ttl, g.keyType)
		if err == nil {
			_, _, err = g.out.WritePair(g.name, crt, key)
		}
		if err != nil || *talosconfig == "" {
			return err
		} else if len(splitList(*endpoints)) == 0 {
			return errors.New("gen client: -talosconfig needs -endpoints")
		}
		ctxName := cmp.Or(*contextName, g.name)
		tc := pki.TalosContext{Endpoints: splitList(*endpoints), Nodes: splitList(*nodes), CA: g.ca.CertPEM, Crt: crt, Key: key}
		if err := pki.WriteTalosconfig(*talosconfig, ctxName, tc, pki.TalosconfigMerge); err != nil {
			return err
		}
		fmt.Fprintf(g.stdout, "wrote context %q to %s\n", ctxName, *talosconfig)
		return nil
	}
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
