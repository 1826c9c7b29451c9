// Package identity is who the demo node says it is: Version (the Talos API
// it follows, tagged "+apid-example", its build, its platform) and Hostname.
//
// It reads the binary's build information and nothing of the host; it must
// not hold state that changes while the node runs.
package identity
