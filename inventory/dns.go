package inventory

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// DNSSource lists nodes from DNS records. The Go resolver does not say
// how long an answer holds, so apid asks the server itself (miekg/dns) and
// refreshes on the records' TTL.
type DNSSource struct {
	// Name is the DNS name asked.
	Name string `yaml:"name"`
	// Type is SRV or A. SRV records give one node per target (named by the
	// target, reached at its address and the record's port, verified
	// against the target name). A asks A and AAAA records and gives one
	// node per address, named by the address. Default: SRV for a name
	// starting with "_" (_apid._tcp.example.org), else A.
	Type string `yaml:"type"`
	// Identity is the name the certificates of A-record nodes carry.
	// Default: the node's address.
	Identity string `yaml:"identity"`
	// Port of A-record nodes' apid. Default: apid's remotePort.
	Port int `yaml:"port"`
	// Role and Labels are given to every node of the source.
	Role   string            `yaml:"role"`
	Labels map[string]string `yaml:"labels"`
}

func (d DNSSource) kind() string {
	if d.Type != "" {
		return strings.ToUpper(d.Type)
	}
	if strings.HasPrefix(d.Name, "_") {
		return "SRV"
	}
	return "A"
}

func (d DNSSource) validate() error {
	if !ValidDNSName(strings.TrimSuffix(d.Name, ".")) {
		return fmt.Errorf("name %q is not a DNS name", d.Name)
	}
	if _, err := netip.ParseAddr(d.Name); err == nil {
		return fmt.Errorf("name %q is an address: list it under inventory.nodes", d.Name)
	}
	if k := d.kind(); k != "SRV" && k != "A" {
		return fmt.Errorf("%s: type %q: want SRV or A", d.Name, d.Type)
	}
	// The nodes it yields must validate too: check with a stand-in.
	probe := Node{Name: "probe.invalid", Identity: d.Identity, Port: d.Port, Role: d.Role, Labels: d.Labels}
	if err := probe.Validate(); err != nil {
		return fmt.Errorf("%s: %w", d.Name, err)
	}
	return nil
}

// defaultDNSServer is the first nameserver of /etc/resolv.conf.
func defaultDNSServer() (string, error) {
	cc, err := dns.ClientConfigFromFile("/etc/resolv.conf")
	if err != nil {
		return "", err
	}
	if len(cc.Servers) == 0 {
		return "", errors.New("/etc/resolv.conf lists no nameserver")
	}
	return net.JoinHostPort(cc.Servers[0], cc.Port), nil
}

// resolver asks one server about one DNSSource.
type resolver struct {
	src    DNSSource
	server string
}

// resolve returns the source's nodes and how long the answer holds (the
// smallest TTL seen).
func (r *resolver) resolve(ctx context.Context) ([]Node, time.Duration, error) {
	name := dns.Fqdn(r.src.Name)
	ttl := uint32(maxTTL)
	if r.src.kind() == "A" {
		addrs, t, err := r.addresses(ctx, name)
		if err != nil {
			return nil, 0, err
		}
		ttl = min(ttl, t)
		if len(addrs) == 0 {
			ttl = emptyTTL
		}
		nodes := make([]Node, 0, len(addrs))
		for _, a := range addrs {
			nodes = append(nodes, Node{Name: a, Address: a, Identity: r.src.Identity, Port: r.src.Port,
				Role: r.src.Role, Labels: r.src.Labels})
		}
		return nodes, time.Duration(ttl) * time.Second, nil
	}
	msg, err := r.ask(ctx, name, dns.TypeSRV)
	if err != nil {
		return nil, 0, err
	}
	extra := map[string][]string{}
	for _, rr := range msg.Extra {
		switch a := rr.(type) {
		case *dns.A:
			extra[strings.ToLower(a.Hdr.Name)] = append(extra[strings.ToLower(a.Hdr.Name)], a.A.String())
			ttl = min(ttl, a.Hdr.Ttl)
		case *dns.AAAA:
			extra[strings.ToLower(a.Hdr.Name)] = append(extra[strings.ToLower(a.Hdr.Name)], a.AAAA.String())
			ttl = min(ttl, a.Hdr.Ttl)
		}
	}
	var nodes []Node
	for _, rr := range msg.Answer {
		srv, ok := rr.(*dns.SRV)
		if !ok {
			continue
		}
		ttl = min(ttl, srv.Hdr.Ttl)
		target := strings.ToLower(srv.Target)
		addrs := extra[target]
		if len(addrs) == 0 {
			var t uint32
			addrs, t, err = r.addresses(ctx, target)
			if err != nil {
				return nil, 0, fmt.Errorf("SRV target %s: %w", target, err)
			}
			ttl = min(ttl, t)
		}
		if len(addrs) == 0 {
			continue // a target without addresses is no node (yet)
		}
		host := strings.TrimSuffix(target, ".")
		nodes = append(nodes, Node{Name: host, Address: addrs[0], Identity: host, Port: int(srv.Port),
			Role: r.src.Role, Labels: r.src.Labels})
	}
	if len(nodes) == 0 {
		ttl = emptyTTL
	}
	return nodes, time.Duration(ttl) * time.Second, nil
}

// maxTTL bounds how long an answer is kept; emptyTTL is how soon a name
// that lists no node is asked again (a cluster coming up fills it soon).
const (
	maxTTL   = 300
	emptyTTL = 5
)

// addresses asks for the A and AAAA records of name.
func (r *resolver) addresses(ctx context.Context, name string) ([]string, uint32, error) {
	ttl := uint32(maxTTL)
	var out []string
	for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
		msg, err := r.ask(ctx, name, qt)
		if err != nil {
			return nil, 0, err
		}
		for _, rr := range msg.Answer {
			var a netip.Addr
			switch v := rr.(type) {
			case *dns.A:
				a, _ = netip.AddrFromSlice(v.A.To4())
			case *dns.AAAA:
				a, _ = netip.AddrFromSlice(v.AAAA)
			default:
				continue // CNAMEs on the way
			}
			ttl = min(ttl, rr.Header().Ttl)
			out = append(out, a.Unmap().String())
		}
	}
	return out, ttl, nil
}

// ask sends one query, over TCP again when the UDP answer was truncated.
// An answer other than NOERROR is an error: the source keeps its nodes.
func (r *resolver) ask(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	q.RecursionDesired = true
	c := &dns.Client{Net: "udp", Timeout: 2 * time.Second}
	msg, _, err := c.ExchangeContext(ctx, q, r.server)
	if err == nil && msg.Truncated {
		c.Net = "tcp"
		msg, _, err = c.ExchangeContext(ctx, q, r.server)
	}
	if err != nil {
		return nil, fmt.Errorf("ask %s for %s %s: %w", r.server, name, dns.TypeToString[qtype], err)
	}
	if msg.Rcode != dns.RcodeSuccess {
		return nil, fmt.Errorf("%s %s: %s", name, dns.TypeToString[qtype], dns.RcodeToString[msg.Rcode])
	}
	return msg, nil
}
