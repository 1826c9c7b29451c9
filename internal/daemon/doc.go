// Package daemon runs apid serve's gateway as a system service: its log
// written in batches, systemd told when it is ready, reloading and
// stopping, SIGHUP answered with a reload, the first SIGTERM or interrupt
// with a drain and a second with an end to the running calls.
//
// It owns the process's signals while it runs. It must not read the
// configuration itself (the command hands it one, and a way to read it
// again), nor hold gateway logic.
package daemon
