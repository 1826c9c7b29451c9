// Package monitoring serves the demo node's monitoring methods from this
// machine's /proc and /sys: Memory, LoadAvg, SystemStat, CPUInfo,
// CPUFreqStats, NetworkDeviceStats, DiskStats, Mounts, Processes and
// Netstat, in Talos's units and layout.
//
// It only reads: it must not change anything on the host, nor report
// anything it did not read there.
package monitoring
