package containers

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// The example agent runs no container runtime: it simulates what talosctl
// asks of one to upgrade a node (talosctl v1.13's upgrade pulls the
// installer image with machine.ImageService/Pull, then calls
// machine.LifecycleService/Upgrade, then reboots). A pull records the
// image, by containerd namespace, with a digest derived from its name;
// nothing is downloaded. List, the legacy MachineService ImageList and
// ImagePull see the recorded images.

// image is one simulated image.
type image struct {
	name    string // normalized reference
	digest  string
	size    int64
	created time.Time
}

// imageStore holds the simulated images by containerd namespace.
type imageStore struct {
	mu     sync.Mutex
	byNS   map[common.ContainerdNamespace][]image
	staged string // the image the last simulated upgrade installed
}

// maxImagesPerNamespace bounds what callers can make the agent remember.
const maxImagesPerNamespace = 256

// normalizeImage checks ref as an image reference and returns it in the
// form containerd stores it: docker.io/library/ for a bare name, :latest
// without a tag or digest.
func normalizeImage(ref string) (string, error) {
	switch {
	case ref == "":
		return "", status.Error(codes.InvalidArgument, "image reference is empty")
	case len(ref) > 4096 || strings.IndexFunc(ref, func(r rune) bool { return unicode.IsSpace(r) || !unicode.IsPrint(r) }) >= 0:
		return "", status.Errorf(codes.InvalidArgument, "invalid image reference %.100q", ref)
	}
	name, digest, hasDigest := strings.Cut(ref, "@")
	if hasDigest && !strings.HasPrefix(digest, "sha256:") {
		return "", status.Errorf(codes.InvalidArgument, "invalid image reference %q: digest must be sha256:…", ref)
	}
	first, rest, hasSlash := strings.Cut(name, "/")
	if !hasSlash || (!strings.ContainsAny(first, ".:") && first != "localhost") {
		if !hasSlash {
			name = "library/" + name
		}
		name = "docker.io/" + name
	} else if rest == "" {
		return "", status.Errorf(codes.InvalidArgument, "invalid image reference %q", ref)
	}
	if !hasDigest && !strings.Contains(name[strings.LastIndexByte(name, '/')+1:], ":") {
		name += ":latest"
	}
	if hasDigest {
		name += "@" + digest
	}
	return name, nil
}

// pull records ref in ns and returns its normalized name.
func (st *imageStore) pull(ns common.ContainerdNamespace, ref string) (image, error) {
	name, err := normalizeImage(ref)
	if err != nil {
		return image{}, err
	}
	sum := sha256.Sum256([]byte(name))
	img := image{name: name, digest: "sha256:" + hex.EncodeToString(sum[:]), size: 50<<20 + int64(sum[0])<<12, created: time.Now().UTC()}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.byNS == nil {
		st.byNS = map[common.ContainerdNamespace][]image{}
	}
	list := slices.DeleteFunc(st.byNS[ns], func(i image) bool { return i.name == name })
	if len(list) >= maxImagesPerNamespace {
		list = list[1:]
	}
	st.byNS[ns] = append(list, img)
	return img, nil
}

func (st *imageStore) list(ns common.ContainerdNamespace) []image {
	st.mu.Lock()
	defer st.mu.Unlock()
	return slices.Clone(st.byNS[ns])
}

func (st *imageStore) has(ns common.ContainerdNamespace, name string) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return slices.ContainsFunc(st.byNS[ns], func(i image) bool { return i.name == name })
}

func (st *imageStore) remove(ns common.ContainerdNamespace, ref string) error {
	name, err := normalizeImage(ref)
	if err != nil {
		return err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	before := len(st.byNS[ns])
	st.byNS[ns] = slices.DeleteFunc(st.byNS[ns], func(i image) bool { return i.name == name })
	if len(st.byNS[ns]) == before {
		return status.Errorf(codes.NotFound, "image %q: not found", name)
	}
	return nil
}

// namespace is the containerd namespace a request names: system unless
// it says otherwise, as in Talos.
func namespace(c *common.ContainerdInstance) common.ContainerdNamespace {
	if ns := c.GetNamespace(); ns != common.ContainerdNamespace_NS_UNKNOWN {
		return ns
	}
	return common.ContainerdNamespace_NS_SYSTEM
}

// imageServer serves machine.ImageService.
type imageServer struct {
	machine.UnimplementedImageServiceServer
	r *Runtime
}

// List streams the simulated images of the request's namespace.
func (i imageServer) List(req *machine.ImageServiceListRequest, stream grpc.ServerStreamingServer[machine.ImageServiceListResponse]) error {
	for _, img := range i.r.images.list(namespace(req.GetContainerd())) {
		if err := stream.Send(&machine.ImageServiceListResponse{Name: img.name, Digest: img.digest, Size: img.size,
			CreatedAt: timestamppb.New(img.created)}); err != nil {
			return err
		}
	}
	return nil
}

// Pull simulates pulling an image: progress for one layer, then the
// image's name.
func (i imageServer) Pull(req *machine.ImageServicePullRequest, stream grpc.ServerStreamingServer[machine.ImageServicePullResponse]) error {
	img, err := i.r.images.pull(namespace(req.GetContainerd()), req.GetImageRef())
	if err != nil {
		return err
	}
	i.r.log.Info("image pull requested; simulating it: the example agent downloads nothing", "image", img.name)
	layer := img.digest[:len("sha256:")+12]
	for _, st := range []machine.ImageServicePullLayerProgress_Status{
		machine.ImageServicePullLayerProgress_DOWNLOADING, machine.ImageServicePullLayerProgress_DOWNLOAD_COMPLETE,
		machine.ImageServicePullLayerProgress_EXTRACTING, machine.ImageServicePullLayerProgress_EXTRACT_COMPLETE,
	} {
		offset := img.size
		if st == machine.ImageServicePullLayerProgress_DOWNLOADING {
			offset = img.size / 2
		}
		if err := stream.Send(&machine.ImageServicePullResponse{Response: &machine.ImageServicePullResponse_PullProgress{
			PullProgress: &machine.ImageServicePullProgress{LayerId: layer, Progress: &machine.ImageServicePullLayerProgress{
				Status: st, Elapsed: durationpb.New(0), Offset: offset, Total: img.size}},
		}}); err != nil {
			return err
		}
	}
	return stream.Send(&machine.ImageServicePullResponse{Response: &machine.ImageServicePullResponse_Name{Name: img.name}})
}

// Remove forgets a simulated image.
func (i imageServer) Remove(_ context.Context, req *machine.ImageServiceRemoveRequest) (*emptypb.Empty, error) {
	if err := i.r.images.remove(namespace(req.GetContainerd()), req.GetImageRef()); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

// Import and Verify need a container runtime and signatures the demo node
// does not have: they say so.
func (imageServer) Import(grpc.ClientStreamingServer[machine.ImageServiceImportRequest, machine.ImageServiceImportResponse]) error {
	return status.Error(codes.FailedPrecondition, "the example agent runs no container runtime: image import is not simulated")
}

func (imageServer) Verify(context.Context, *machine.ImageServiceVerifyRequest) (*machine.ImageServiceVerifyResponse, error) {
	return nil, status.Error(codes.FailedPrecondition, "the example agent runs no container runtime: image signatures are not verified")
}

// ImageList is MachineService's older listing of the same images.
func (r *Runtime) ImageList(req *machine.ImageListRequest, stream grpc.ServerStreamingServer[machine.ImageListResponse]) error {
	ns := req.GetNamespace()
	if ns == common.ContainerdNamespace_NS_UNKNOWN {
		ns = common.ContainerdNamespace_NS_SYSTEM
	}
	for _, img := range r.images.list(ns) {
		if err := stream.Send(&machine.ImageListResponse{Name: img.name, Digest: img.digest, Size: img.size,
			CreatedAt: timestamppb.New(img.created)}); err != nil {
			return err
		}
	}
	return nil
}

// ImagePull is MachineService's older, unary pull.
func (r *Runtime) ImagePull(_ context.Context, req *machine.ImagePullRequest) (*machine.ImagePullResponse, error) {
	ns := req.GetNamespace()
	if ns == common.ContainerdNamespace_NS_UNKNOWN {
		ns = common.ContainerdNamespace_NS_SYSTEM
	}
	img, err := r.images.pull(ns, req.GetReference())
	if err != nil {
		return nil, err
	}
	r.log.Info("image pull requested; simulating it: the example agent downloads nothing", "image", img.name)
	return &machine.ImagePullResponse{Messages: []*machine.ImagePull{{}}}, nil
}

// lifecycleServer serves machine.LifecycleService.
type lifecycleServer struct {
	machine.UnimplementedLifecycleServiceServer
	r *Runtime
}

// Upgrade simulates installing the pulled installer image, as Talos does
// before the reboot talosctl asks for next: progress messages, then exit
// code 0. The image must have been pulled into the namespace first, as
// Talos requires.
func (l lifecycleServer) Upgrade(req *machine.LifecycleServiceUpgradeRequest, stream grpc.ServerStreamingServer[machine.LifecycleServiceUpgradeResponse]) error {
	ns := namespace(req.GetContainerd())
	name, err := normalizeImage(req.GetSource().GetImageName())
	if err != nil {
		return err
	}
	if !l.r.images.has(ns, name) {
		return status.Errorf(codes.FailedPrecondition, "image %q is not in the %s namespace: pull it first (talosctl image pull)", name, ns)
	}
	l.r.log.Info("upgrade requested; simulating the install: the example agent installs nothing", "image", name)
	send := func(p *machine.LifecycleServiceInstallProgress) error {
		return stream.Send(&machine.LifecycleServiceUpgradeResponse{Progress: p})
	}
	for _, msg := range []string{
		fmt.Sprintf("simulating the installation of %s (the example agent writes nothing to disk)", name),
		"installation simulated; reboot to run the new version",
	} {
		if err := send(&machine.LifecycleServiceInstallProgress{Response: &machine.LifecycleServiceInstallProgress_Message{Message: msg}}); err != nil {
			return err
		}
	}
	l.r.images.mu.Lock()
	l.r.images.staged = name
	l.r.images.mu.Unlock()
	return send(&machine.LifecycleServiceInstallProgress{Response: &machine.LifecycleServiceInstallProgress_ExitCode{ExitCode: 0}})
}

// Install is for a machine without Talos: this one has it already.
func (lifecycleServer) Install(*machine.LifecycleServiceInstallRequest, grpc.ServerStreamingServer[machine.LifecycleServiceInstallResponse]) error {
	return status.Error(codes.FailedPrecondition, "Talos is already installed on this (simulated) machine: use upgrade")
}
