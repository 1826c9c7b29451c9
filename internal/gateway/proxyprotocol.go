package gateway

import (
	"net"
	"net/netip"

	"github.com/pires/go-proxyproto"
)

// proxyProtocol wraps lis so that connections from the configured
// balancers must begin with a PROXY protocol header (v1 or v2) naming the
// client, and connections from anywhere else must not carry one. The
// header is read when a connection's address is first asked for, on the
// connection's own goroutine, within the handshake timeout.
func proxyProtocol(lis net.Listener, cfg Config) net.Listener {
	if len(cfg.ProxyProtocol) == 0 {
		return lis
	}
	var balancers []netip.Prefix
	for _, n := range cfg.ProxyProtocol {
		if p, err := netip.ParsePrefix(n); err == nil { // Validate refused the others
			balancers = append(balancers, p.Masked())
		}
	}
	return &proxyproto.Listener{
		Listener:          lis,
		ReadHeaderTimeout: cfg.HandshakeTimeout,
		ConnPolicy: func(o proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
			if addr, ok := o.Upstream.(*net.TCPAddr); ok {
				ip, _ := netip.AddrFromSlice(addr.IP)
				for _, b := range balancers {
					if b.Contains(ip.Unmap()) {
						return proxyproto.REQUIRE, nil
					}
				}
			}
			return proxyproto.REJECT, nil
		},
	}
}
