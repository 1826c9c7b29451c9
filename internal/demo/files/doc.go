// Package files serves the demo node's files, read-only: Read, List,
// DiskUsage and Copy (a gzipped tar archive), confined to the read roots
// (by default /proc, /sys and /etc). Paths are checked lexically, then
// resolved, and then opened through an os.Root, so that neither ".." nor a
// symlink, not even one swapped in meanwhile, leads out of a root; walks
// and archives are bounded.
//
// It must not write, create or delete a file, nor read what reading would
// take from others (/proc/kmsg, the tracing pipes); the kernel's boot ID is
// refused, as the node's reboots are simulated.
package files
