// Package machineconfig is the demo node's machine configuration, as Talos
// manages it: ApplyConfiguration (talosctl apply-config) loads and validates
// a document with the machinery module's loader, and applies it in the mode
// asked, on a simulated machine that needs no reboot for any change. What is
// active is published to the resource API's machineconfig (os:admin only).
//
// It holds configurations and nothing else: it must not act on them (no
// service is configured by them) nor reboot the machine itself, which it
// asks of whoever made it (Config.Reboot).
package machineconfig
