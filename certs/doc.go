// Package certs owns apid's certificates at run time: the server and client
// *tls.Config values (TLS 1.3, client certificates required, per-node server
// names), the roles a peer certificate carries, and the key material,
// re-read when its files change so that rotation never cuts a connection.
//
// It knows nothing about routing, gRPC metadata or API methods: callers ask
// it who a peer is (Roles, PeerCertificate) and for configs that always
// present the current material; what a role may do is decided by package
// auth. Making certificates is package pki's job.
package certs
