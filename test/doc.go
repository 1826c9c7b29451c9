// Package test holds apid's end-to-end and fault tests: they build the apid
// binary, start real processes on loopback addresses and talk to them with
// the official Talos Go client.
package test
