package gateway

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/inventory"
)

// checkMaterial reports, one line each and by key, what cannot work with
// the key material src holds under cfg, which Validate cannot see without
// reading the files: a CA bundle that lacks the issuer of the node's own
// certificate (every client would be refused while /readyz says ready), a
// node certificate that is not a server's or names nothing a client can
// verify, selfNames the certificate does not carry, a forwarding identity
// the CA bundle does not vouch for. warnings are what works here but not
// against Talos nodes or other apids.
func checkMaterial(cfg Config, src *certs.Source) (problems, warnings []error) {
	leaf := src.Certificate().Leaf
	pool := src.Pool()
	subject := leaf.Subject.String()

	if !hasUsage(leaf, x509.ExtKeyUsageServerAuth) {
		problems = append(problems, fmt.Errorf("cert %s (%s) does not allow server authentication, so clients refuse it: use the node certificate apid gen node writes (NAME.crt), not a client certificate",
			cfg.TLS.Cert, subject))
	}
	if len(leaf.DNSNames) == 0 && len(leaf.IPAddresses) == 0 {
		problems = append(problems, fmt.Errorf("cert %s (%s) names no DNS name or IP address (SAN), so no client can verify it (\"doesn't contain any IP SANs\"): reissue it with apid gen node -ip/-dns",
			cfg.TLS.Cert, subject))
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: intermediates(src), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		problems = append(problems, fmt.Errorf("ca %s does not hold the CA that issued cert %s (issuer %s): this node could verify no client and no node, and they would refuse it: add that CA to the bundle (%v)",
			cfg.TLS.CA, cfg.TLS.Cert, leaf.Issuer.String(), err))
	}

	set, _ := inventory.NewSet(cfg.Inventory.Nodes) // Validate reports a bad set
	for _, name := range cfg.Routing.SelfNames {
		if leaf.VerifyHostname(strings.Trim(name, "[]")) == nil {
			continue
		}
		// A name the inventory knows is verified as its identity.
		if n, ok := set.Lookup(name); ok && leaf.VerifyHostname(strings.Trim(n.Identity, "[]")) == nil {
			continue
		}
		problems = append(problems, fmt.Errorf("selfNames %q: cert %s does not carry it (it names %s), so a node that forwards to this one by that name would refuse its certificate: add it to the certificate (apid gen node -dns/-ip) or remove it",
			name, cfg.TLS.Cert, describeNames(leaf)))
	}

	host, _, _ := net.SplitHostPort(cfg.Listen)
	if ip := net.ParseIP(strings.Trim(host, "[]")); ip != nil && !ip.IsUnspecified() {
		// A warning, not a problem: behind a TCP balancer clients dial the
		// balancer's name, and other apids verify a node by its inventory
		// identity; only those that dial this address fail.
		if leaf.VerifyHostname(ip.String()) != nil {
			warnings = append(warnings, fmt.Errorf("listen %s: cert %s does not carry the IP address %s (it names %s), so a client or apid that dials this address fails (\"cannot validate certificate for %s because it doesn't contain any IP SANs\"): reissue it with apid gen node -ip %s, unless everyone reaches it by a name it carries",
				cfg.Listen, cfg.TLS.Cert, ip, describeNames(leaf), ip, ip))
		}
	} else if host == "" || (ip != nil && ip.IsUnspecified()) {
		warnings = append(warnings, fmt.Errorf("listen %s is every address of this machine: clients (and the balancer in front) must reach apid by a name or address cert %s carries: %s",
			cfg.Listen, cfg.TLS.Cert, describeNames(leaf)))
	}

	fwd := src.ClientCertificate()
	switch {
	case cfg.TLS.ClientCert == "" && !cfg.Routing.LocalOnly && !hasUsage(leaf, x509.ExtKeyUsageClientAuth):
		problems = append(problems, fmt.Errorf("clientCert: not set, and cert %s (%s) allows server authentication only, so this node has no identity to forward with and every call it forwards would fail at the node (\"tls: bad certificate\"): set clientCert and clientKey (apid gen node writes NAME-client.crt), or localOnly: true on a node that never forwards",
			cfg.TLS.Cert, subject))
	case cfg.TLS.ClientCert == "" && !cfg.Routing.LocalOnly:
		warnings = append(warnings, errors.New("clientCert: not set, so this node forwards with its serving certificate, which Talos's apid (and apid, unless allowCombinedClientCertificates) refuses: set clientCert and clientKey (apid gen node writes NAME-client.crt), or localOnly: true on a node that never forwards"))
	case cfg.TLS.ClientCert != "":
		if _, err := fwd.Leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			problems = append(problems, fmt.Errorf("clientCert %s (%s) is not issued by a CA in ca %s, so every node would refuse it: %v",
				cfg.TLS.ClientCert, fwd.Leaf.Subject.String(), cfg.TLS.CA, err))
		}
	}
	return problems, warnings
}

func hasUsage(c *x509.Certificate, u x509.ExtKeyUsage) bool {
	return len(c.ExtKeyUsage) == 0 || slices.Contains(c.ExtKeyUsage, u) || slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageAny)
}

// intermediates are the certificates that follow the leaf in the
// certificate file.
func intermediates(src *certs.Source) *x509.CertPool {
	pool := x509.NewCertPool()
	for _, der := range src.Certificate().Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			pool.AddCert(c)
		}
	}
	return pool
}

func describeNames(c *x509.Certificate) string {
	names := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	if len(names) == 0 {
		return "nothing"
	}
	return strings.Join(names, ", ")
}

// CheckFiles reads the files cfg names (certificates, inventory files) and
// lists every problem that would stop serve, one a line, and the warnings
// of what works here but not against Talos nodes. Validate reports the
// keys themselves.
func CheckFiles(cfg Config) (problems, warnings []error) {
	if err := cfg.Inventory.CheckFiles(); err != nil {
		problems = append(problems, unjoin(err)...)
	}
	if cfg.TLS.CA == "" || cfg.TLS.Cert == "" || cfg.TLS.Key == "" {
		return problems, nil // Validate names the missing files
	}
	src, err := certs.NewSource(cfg.TLS.Files)
	if err != nil {
		return append(problems, fmt.Errorf("certificates: %w", err)), nil
	}
	p, w := checkMaterial(cfg, src)
	problems = append(problems, p...)
	if err := cfg.Disruption.Etcd.CheckFiles(cfg.TLS.Key, cfg.TLS.ClientKey); err != nil {
		problems = append(problems, err)
	}
	if cfg.Disruption.Enabled && !cfg.Disruption.Etcd.Configured() && !cfg.Routing.LocalOnly {
		w = append(w, errors.New("disruption.etcd: not set, so the disruption budget is this gateway's alone: callers reaching the cluster through two gateways at once may each take a node of a group down; set disruption.etcd to share it through the cluster's etcd"))
	}
	return problems, w
}

// unjoin splits errors.Join's error into its parts.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}
