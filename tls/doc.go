// Package tls owns apid's certificates: the server and client *tls.Config
// values, the roles carried by a peer certificate, reloading key material
// when its files change, and generating a small PKI (CA, node and client
// certificates, talosconfig files).
//
// It knows nothing about routing, gRPC metadata or API methods: callers ask it
// who a peer is (Roles, PeerCertificate) and for configs that always present
// the current material; what a role may do is decided elsewhere.
package tls
