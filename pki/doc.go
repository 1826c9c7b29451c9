// Package pki makes key material: a CA, node certificates (serverAuth and
// clientAuth, os:impersonator) and client certificates carrying roles, and
// writes them, and talosconfig files, atomically with the right modes.
//
// It is used by the commands that set a cluster up (apid gen, apid demo)
// and by tests; the running gateway only reads what it made, through
// package certs.
package pki
