// Package containers is the demo node's container runtime, which runs no
// containers: Containers, Stats and LogsContainers answer with empty lists,
// Restart says why it cannot, and images are simulated, so that talosctl
// can upgrade a node (machine.ImageService's Pull, List and Remove, the
// legacy ImageList and ImagePull, and machine.LifecycleService's Upgrade,
// an install that writes nothing).
//
// A pull records the image's name, normalized as containerd does, and a
// digest derived from it; it must not download anything, nor start a
// process.
package containers
