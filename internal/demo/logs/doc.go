// Package logs serves the demo node's logs: Logs, by ID (the node's own,
// each simulated service's, the controller runtime's, those of the services
// beside the node, and the kernel's), and Dmesg, the kernel log read from
// /dev/kmsg, with labelled synthetic lines where it cannot be read.
//
// It keeps and streams what others write into its Lines; it must not decide
// what is logged, nor write to the kernel log.
package logs
