// Package etcd is the demo's etcd: a real member of a real cluster, run
// in-process on a control-plane node (etcd's embed package; Start), and the
// etcd API Talos serves against it (EtcdMemberList, EtcdStatus, alarms,
// defragment, forfeit leadership, leave, remove member, snapshot, and
// EtcdRecover, which keeps and checks an uploaded snapshot). A worker has no
// member and answers as a Talos worker does.
//
// It talks to etcd through etcd's own client only; it must not edit etcd's
// data behind its back, nor serve anything but the etcd calls.
package etcd
