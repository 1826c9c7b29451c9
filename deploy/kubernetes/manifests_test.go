// Package kubernetes holds apid's Kubernetes manifests; its tests decode
// them strictly against the Kubernetes API types and check the properties
// apid relies on.
package kubernetes

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kjson "k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

const (
	containerName = "apid"
	configKey     = "apid.yaml"
	// referenceConfig documents every configuration key apid knows.
	referenceConfig = "../apid.yaml"
)

// allowedKinds are the only kinds the manifests may hold. The decoder knows
// every core, apps and policy kind; a Secret, say, decodes but is refused.
var allowedKinds = map[schema.GroupVersionKind]bool{
	corev1.SchemeGroupVersion.WithKind("ConfigMap"):             true,
	appsv1.SchemeGroupVersion.WithKind("DaemonSet"):             true,
	policyv1.SchemeGroupVersion.WithKind("PodDisruptionBudget"): true,
}

// strictDecoder is apimachinery's YAML serializer in strict mode: unknown
// or duplicate fields, fields in the wrong case, and kinds the scheme does
// not know are errors.
func strictDecoder(t testing.TB) runtime.Decoder {
	t.Helper()
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, policyv1.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatal(err)
		}
	}
	return kjson.NewSerializerWithOptions(kjson.DefaultMetaFactory, scheme, scheme,
		kjson.SerializerOptions{Yaml: true, Strict: true})
}

// decodeDoc decodes one YAML document; an empty or comment-only document
// gives a nil object.
func decodeDoc(dec runtime.Decoder, doc []byte) (runtime.Object, error) {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, err
	}
	if s := string(bytes.TrimSpace(j)); s == "null" || s == "" {
		return nil, nil
	}
	obj, gvk, err := dec.Decode(doc, nil, nil)
	if err != nil {
		return nil, err
	}
	if !allowedKinds[*gvk] {
		return nil, fmt.Errorf("kind %s is not expected here (allowed: ConfigMap, DaemonSet, PodDisruptionBudget)", gvk)
	}
	return obj, nil
}

// manifests are the decoded objects of every YAML file under this directory.
type manifests struct {
	configMaps []*corev1.ConfigMap
	daemonSets []*appsv1.DaemonSet
	pdbs       []*policyv1.PodDisruptionBudget
	all        []metav1.Object
}

func load(t *testing.T) *manifests {
	t.Helper()
	dec := strictDecoder(t)
	m := &manifests{}
	var files []string
	err := filepath.WalkDir(".", func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no YAML files under deploy/kubernetes")
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
		for n := 1; ; n++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: document %d: %v", file, n, err)
			}
			obj, err := decodeDoc(dec, doc)
			if err != nil {
				t.Errorf("%s: document %d: %v", file, n, err)
				continue
			}
			switch o := obj.(type) {
			case nil:
				continue
			case *corev1.ConfigMap:
				m.configMaps = append(m.configMaps, o)
				m.all = append(m.all, o)
			case *appsv1.DaemonSet:
				m.daemonSets = append(m.daemonSets, o)
				m.all = append(m.all, o)
			case *policyv1.PodDisruptionBudget:
				m.pdbs = append(m.pdbs, o)
				m.all = append(m.all, o)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return m
}

// TestStrictDecoding shows that the decoder rejects what it must, so that
// a pass of TestManifests means something.
func TestStrictDecoding(t *testing.T) {
	dec := strictDecoder(t)
	const good = `apiVersion: apps/v1
kind: DaemonSet
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      hostNetwork: true
      containers: [{name: c, image: "i:1"}]
`
	if _, err := decodeDoc(dec, []byte(good)); err != nil {
		t.Fatalf("a valid DaemonSet fails: %v", err)
	}
	for name, bad := range map[string]string{
		"unknown field":             strings.Replace(good, "hostNetwork: true", "hostNetwork: true\n      hostNetworking: true", 1),
		"field in a different case": strings.Replace(good, "hostNetwork", "hostnetwork", 1),
		"duplicate field":           strings.Replace(good, "hostNetwork: true", "hostNetwork: true\n      hostNetwork: false", 1),
		"wrong type":                strings.Replace(good, "hostNetwork: true", "hostNetwork: [true]", 1),
		"unknown kind":              strings.Replace(good, "kind: DaemonSet", "kind: DaemonSett", 1),
		"unknown version":           strings.Replace(good, "apps/v1", "apps/v2", 1),
		"no kind":                   strings.Replace(good, "kind: DaemonSet\n", "", 1),
		"kind not allowed":          "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {node.key: x}\n",
	} {
		if bad == good {
			t.Errorf("%s: the edit did not apply", name)
			continue
		}
		if _, err := decodeDoc(dec, []byte(bad)); err == nil {
			t.Errorf("%s: decoded without error", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

func TestManifests(t *testing.T) {
	m := load(t)
	for _, o := range m.all {
		if o.GetNamespace() != "" {
			t.Errorf("%s sets namespace %q; the manifests are applied with -n", o.GetName(), o.GetNamespace())
		}
	}
	if len(m.daemonSets) != 1 {
		t.Fatalf("%d DaemonSets; want 1", len(m.daemonSets))
	}
	if len(m.pdbs) != 1 {
		t.Fatalf("%d PodDisruptionBudgets; want 1", len(m.pdbs))
	}
}

// fixture is the DaemonSet, its apid container and the apid configuration.
type fixture struct {
	m      *manifests
	ds     *appsv1.DaemonSet
	pod    *corev1.PodSpec
	c      *corev1.Container
	config map[string]any
}

func setup(t *testing.T) *fixture {
	t.Helper()
	m := load(t)
	if len(m.daemonSets) != 1 {
		t.Fatalf("%d DaemonSets; want 1", len(m.daemonSets))
	}
	f := &fixture{m: m, ds: m.daemonSets[0]}
	f.pod = &f.ds.Spec.Template.Spec
	for i := range f.pod.Containers {
		if f.pod.Containers[i].Name == containerName {
			f.c = &f.pod.Containers[i]
		}
	}
	if f.c == nil {
		t.Fatalf("DaemonSet %s has no container %q", f.ds.Name, containerName)
	}
	f.config = f.apidConfig(t)
	return f
}

// flagValues returns the values of a Go flag in args: "-name v",
// "--name v", "-name=v".
func flagValues(args []string, name string) []string {
	var vs []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			continue
		}
		a = strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		if a == name && i+1 < len(args) {
			vs = append(vs, args[i+1])
			i++
		} else if v, ok := strings.CutPrefix(a, name+"="); ok {
			vs = append(vs, v)
		}
	}
	return vs
}

func (f *fixture) oneFlag(t *testing.T, name string) string {
	t.Helper()
	vs := flagValues(f.c.Args, name)
	if len(vs) != 1 {
		t.Fatalf("container args %q give -%s %d times; want once", f.c.Args, name, len(vs))
	}
	return vs[0]
}

func (f *fixture) volume(name string) *corev1.Volume {
	for i := range f.pod.Volumes {
		if f.pod.Volumes[i].Name == name {
			return &f.pod.Volumes[i]
		}
	}
	return nil
}

// mountOf finds the volume mount holding the file p and the volume behind it.
func (f *fixture) mountOf(t *testing.T, p string) (*corev1.VolumeMount, *corev1.Volume) {
	t.Helper()
	var best *corev1.VolumeMount
	for i := range f.c.VolumeMounts {
		vm := &f.c.VolumeMounts[i]
		if strings.HasPrefix(p, strings.TrimSuffix(vm.MountPath, "/")+"/") && (best == nil || len(vm.MountPath) > len(best.MountPath)) {
			best = vm
		}
	}
	if best == nil {
		t.Fatalf("no volume mount holds %s", p)
	}
	v := f.volume(best.Name)
	if v == nil {
		t.Fatalf("mount %s names volume %q, which does not exist", best.MountPath, best.Name)
	}
	return best, v
}

func (f *fixture) envSource(name string) *corev1.EnvVarSource {
	for _, e := range f.c.Env {
		if e.Name == name {
			if e.ValueFrom == nil {
				return &corev1.EnvVarSource{}
			}
			return e.ValueFrom
		}
	}
	return nil
}

func (f *fixture) configMap(name string) *corev1.ConfigMap {
	for _, cm := range f.m.configMaps {
		if cm.Name == name {
			return cm
		}
	}
	return nil
}

// apidConfig is the apid.yaml the container reads, from its ConfigMap.
func (f *fixture) apidConfig(t *testing.T) map[string]any {
	t.Helper()
	file := f.oneFlag(t, "config")
	vm, v := f.mountOf(t, file)
	if v.ConfigMap == nil {
		t.Fatalf("-config %s is on volume %q, not a ConfigMap", file, v.Name)
	}
	if vm.SubPath != "" {
		t.Errorf("the config is mounted with subPath, which never sees ConfigMap updates")
	}
	cm := f.configMap(v.ConfigMap.Name)
	if cm == nil {
		t.Fatalf("ConfigMap %q (the config) is not in the manifests", v.ConfigMap.Name)
	}
	key := path.Base(file)
	text, ok := cm.Data[key]
	if !ok {
		t.Fatalf("ConfigMap %s has no key %q for -config %s", cm.Name, key, file)
	}
	j, err := yaml.YAMLToJSONStrict([]byte(text))
	if err != nil {
		t.Fatalf("ConfigMap %s key %s: %v", cm.Name, key, err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(j, &cfg); err != nil {
		t.Fatalf("ConfigMap %s key %s: %v", cm.Name, key, err)
	}
	return cfg
}

func TestScheduling(t *testing.T) {
	f := setup(t)
	if !f.pod.HostNetwork {
		t.Error("hostNetwork is off; other nodes and the balancer reach apid at the node's address")
	}
	if _, ok := f.pod.NodeSelector["node-role.kubernetes.io/control-plane"]; !ok {
		t.Errorf("nodeSelector %v does not pick control-plane nodes", f.pod.NodeSelector)
	}
	tolerated := false
	for _, tol := range f.pod.Tolerations {
		if tol.Key == "node-role.kubernetes.io/control-plane" &&
			(tol.Operator == corev1.TolerationOpExists || tol.Value == "") &&
			(tol.Effect == "" || tol.Effect == corev1.TaintEffectNoSchedule) {
			tolerated = true
		}
	}
	if !tolerated {
		t.Errorf("tolerations %v do not tolerate the control-plane NoSchedule taint", f.pod.Tolerations)
	}
	if s := f.ds.Spec.UpdateStrategy; s.Type != appsv1.RollingUpdateDaemonSetStrategyType ||
		s.RollingUpdate == nil || s.RollingUpdate.MaxUnavailable == nil || *s.RollingUpdate.MaxUnavailable != intstr.FromInt32(1) {
		t.Errorf("updateStrategy %+v; want RollingUpdate with maxUnavailable 1", s)
	}
	if a := f.pod.AutomountServiceAccountToken; a == nil || *a {
		t.Error("automountServiceAccountToken is not false; apid needs no API token")
	}
}

func TestImagePinned(t *testing.T) {
	f := setup(t)
	for _, c := range append(slices.Clone(f.pod.InitContainers), f.pod.Containers...) {
		ref := c.Image
		digest := ""
		if i := strings.Index(ref, "@"); i >= 0 {
			ref, digest = ref[:i], ref[i+1:]
		}
		tag := ""
		if last := ref[strings.LastIndex(ref, "/")+1:]; strings.Contains(last, ":") {
			tag = last[strings.LastIndex(last, ":")+1:]
		}
		switch {
		case tag == "" && digest == "":
			t.Errorf("container %s: image %q has no tag", c.Name, c.Image)
		case tag == "latest":
			t.Errorf("container %s: image %q uses :latest", c.Name, c.Image)
		case digest != "" && !strings.HasPrefix(digest, "sha256:"):
			t.Errorf("container %s: image %q has a malformed digest", c.Name, c.Image)
		}
	}
}

var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// fieldPaths are the pod fields the downward API gives an env variable.
var fieldPaths = []string{"metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName",
	"spec.serviceAccountName", "status.hostIP", "status.hostIPs", "status.podIP", "status.podIPs"}

func TestNodeIdentity(t *testing.T) {
	f := setup(t)

	// The kubelet leaves $(X) as it is when X is not a variable of the
	// container, so every reference must resolve.
	for _, a := range append(slices.Clone(f.c.Command), f.c.Args...) {
		for _, m := range envRef.FindAllStringSubmatch(strings.ReplaceAll(a, "$$", ""), -1) {
			if f.envSource(m[1]) == nil {
				t.Errorf("argument %q uses $(%s), which is not in the container's env", a, m[1])
			}
		}
	}
	for _, e := range f.c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && !slices.Contains(fieldPaths, e.ValueFrom.FieldRef.FieldPath) {
			t.Errorf("env %s: the downward API has no field %q", e.Name, e.ValueFrom.FieldRef.FieldPath)
		}
	}
	src := f.envSource("NODE_NAME")
	if src == nil || src.FieldRef == nil || src.FieldRef.FieldPath != "spec.nodeName" {
		t.Fatalf("NODE_NAME is not the downward API's spec.nodeName: %+v", src)
	}

	// Each node's own files, named as `apid gen node -name NODE` writes
	// them, from a read-only hostPath directory.
	for flag, ext := range map[string]string{"cert": ".crt", "key": ".key"} {
		file := f.oneFlag(t, flag)
		if path.Base(file) != "$(NODE_NAME)"+ext {
			t.Errorf("-%s %s; want DIR/$(NODE_NAME)%s, the name apid gen node gives it", flag, file, ext)
		}
		vm, v := f.mountOf(t, file)
		switch {
		case v.HostPath == nil:
			t.Errorf("-%s %s is on volume %q, not a hostPath", flag, file, v.Name)
		case v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectory:
			t.Errorf("hostPath %s: type %v; want Directory, so a missing directory fails instead of being created empty", v.HostPath.Path, v.HostPath.Type)
		}
		if !vm.ReadOnly {
			t.Errorf("mount %s (%s) is writable", vm.MountPath, flag)
		}
	}

	// How clients may name this node: its node name and its addresses.
	selves := strings.Join(flagValues(f.c.Args, "self"), ",")
	if !strings.Contains(selves, "$(NODE_NAME)") {
		t.Errorf("-self %q does not include $(NODE_NAME)", selves)
	}
	hasAddr := false
	for _, m := range envRef.FindAllStringSubmatch(selves, -1) {
		if src := f.envSource(m[1]); src != nil && src.FieldRef != nil && strings.HasPrefix(src.FieldRef.FieldPath, "status.") {
			hasAddr = true
		}
	}
	if !hasAddr {
		t.Errorf("-self %q includes none of the node's addresses from the downward API", selves)
	}
}

func TestNoKeysInTheAPI(t *testing.T) {
	f := setup(t)
	for _, v := range f.pod.Volumes {
		if v.Secret != nil {
			t.Errorf("volume %s mounts Secret %s; node keys stay on their nodes", v.Name, v.Secret.SecretName)
		}
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.Secret != nil {
					t.Errorf("volume %s projects Secret %s; node keys stay on their nodes", v.Name, s.Secret.Name)
				}
			}
		}
	}
	for _, c := range append(slices.Clone(f.pod.InitContainers), f.pod.Containers...) {
		for _, e := range c.Env {
			if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
				t.Errorf("container %s: env %s comes from a Secret", c.Name, e.Name)
			}
		}
		for _, e := range c.EnvFrom {
			if e.SecretRef != nil {
				t.Errorf("container %s: env from Secret %s", c.Name, e.SecretRef.Name)
			}
		}
	}
	for _, cm := range f.m.configMaps {
		for k, v := range cm.Data {
			if strings.Contains(v, "PRIVATE KEY") {
				t.Errorf("ConfigMap %s key %s holds a private key", cm.Name, k)
			}
		}
		if len(cm.BinaryData) > 0 {
			t.Errorf("ConfigMap %s has binaryData; the CA and config are text", cm.Name)
		}
	}
	// apid writes nothing on the host.
	for _, vm := range f.c.VolumeMounts {
		if v := f.volume(vm.Name); v != nil && v.HostPath != nil && !vm.ReadOnly {
			t.Errorf("hostPath %s is mounted writable at %s", v.HostPath.Path, vm.MountPath)
		}
	}
}

func TestConfigFromConfigMaps(t *testing.T) {
	f := setup(t)

	// Every key is one apid knows (deploy/apid.yaml lists them all).
	data, err := os.ReadFile(referenceConfig)
	if err != nil {
		t.Fatal(err)
	}
	var ref map[string]any
	if err := yaml.Unmarshal(data, &ref); err != nil {
		t.Fatalf("%s: %v", referenceConfig, err)
	}
	checkKeys(t, "", f.config, ref)

	// The CA bundle is public and comes from a ConfigMap.
	ca, _ := f.config["ca"].(string)
	if vs := flagValues(f.c.Args, "ca"); len(vs) > 0 {
		ca = vs[len(vs)-1]
	}
	if ca == "" {
		t.Fatal("no CA bundle: neither the config's ca nor -ca")
	}
	_, v := f.mountOf(t, ca)
	if v.ConfigMap == nil {
		t.Fatalf("the CA bundle %s is on volume %q, not a ConfigMap", ca, v.Name)
	}
	if items := v.ConfigMap.Items; len(items) > 0 && !slices.ContainsFunc(items, func(k corev1.KeyToPath) bool { return k.Path == path.Base(ca) }) {
		t.Errorf("ConfigMap volume %s does not project %s", v.Name, path.Base(ca))
	}
}

// checkKeys reports keys of got (a config) that want (the reference) lacks.
func checkKeys(t *testing.T, prefix string, got, want map[string]any) {
	t.Helper()
	for k, v := range got {
		rv, ok := want[k]
		if !ok {
			t.Errorf("config key %s%s is not one apid knows (see %s)", prefix, k, referenceConfig)
			continue
		}
		if sub, ok := v.(map[string]any); ok {
			if rsub, ok := rv.(map[string]any); ok {
				checkKeys(t, prefix+k+".", sub, rsub)
			}
		}
	}
}

// port resolves a probe's port, by number or by the container port's name.
func (f *fixture) port(p intstr.IntOrString) int32 {
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, cp := range f.c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	return -1
}

func TestProbes(t *testing.T) {
	f := setup(t)

	admin, _ := f.config["adminListen"].(string)
	if admin == "" {
		admin = "127.0.0.1:50001" // apid's default
	}
	adminHost, adminPort, err := net.SplitHostPort(admin)
	if err != nil {
		t.Fatalf("adminListen %q: %v", admin, err)
	}
	if adminPort != "50001" {
		t.Errorf("adminListen %s; the probes and the balancer use port 50001", admin)
	}

	for _, p := range []struct {
		kind  string
		probe *corev1.Probe
		path  string
	}{
		{"readinessProbe", f.c.ReadinessProbe, "/readyz"},
		{"livenessProbe", f.c.LivenessProbe, "/healthz"},
	} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("container %s: no HTTP %s", f.c.Name, p.kind)
			continue
		}
		g := p.probe.HTTPGet
		if g.Path != p.path {
			t.Errorf("%s path %s; want %s", p.kind, g.Path, p.path)
		}
		if port := f.port(g.Port); fmt.Sprint(port) != adminPort || port != 50001 {
			t.Errorf("%s port %s (%d); want 50001, where adminListen %s serves", p.kind, g.Port.String(), port, admin)
		}
		if g.Host != "127.0.0.1" {
			t.Errorf("%s host %q; want 127.0.0.1, the node's loopback (hostNetwork)", p.kind, g.Host)
		}
		if adminHost != g.Host && adminHost != "" && adminHost != "0.0.0.0" && adminHost != "::" {
			t.Errorf("%s goes to %s but adminListen is %s", p.kind, g.Host, admin)
		}
		if g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP {
			t.Errorf("%s scheme %s; the admin port is plain HTTP", p.kind, g.Scheme)
		}
	}
}

// duration reads a duration from the config, or its default.
func duration(t *testing.T, cfg map[string]any, key string, def time.Duration) time.Duration {
	t.Helper()
	v, ok := cfg[key]
	if !ok {
		return def
	}
	s, _ := v.(string)
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("config %s %v: %v", key, v, err)
	}
	return d
}

func TestGracefulStop(t *testing.T) {
	f := setup(t)
	need := duration(t, f.config, "drainDelay", 5*time.Second) +
		duration(t, f.config, "shutdownTimeout", 30*time.Second) + 10*time.Second
	need = max(need, 45*time.Second)
	g := f.pod.TerminationGracePeriodSeconds
	if g == nil {
		t.Errorf("terminationGracePeriodSeconds is unset (30s by default); want >= %v (drainDelay + shutdownTimeout + a margin)", need)
	} else if time.Duration(*g)*time.Second < need {
		t.Errorf("terminationGracePeriodSeconds %d; want >= %v (drainDelay + shutdownTimeout + a margin)", *g, need)
	}
	if f.c.Lifecycle != nil && f.c.Lifecycle.PreStop != nil {
		t.Log("a preStop hook runs before SIGTERM and eats into the grace period")
	}
}

func TestSecurityContext(t *testing.T) {
	f := setup(t)
	ps := f.pod.SecurityContext
	if ps == nil {
		ps = &corev1.PodSecurityContext{}
	}
	cs := f.c.SecurityContext
	if cs == nil {
		t.Fatal("the apid container has no securityContext")
	}
	nonRoot := ps.RunAsNonRoot
	if cs.RunAsNonRoot != nil {
		nonRoot = cs.RunAsNonRoot
	}
	if nonRoot == nil || !*nonRoot {
		t.Error("runAsNonRoot is not true")
	}
	uid := ps.RunAsUser
	if cs.RunAsUser != nil {
		uid = cs.RunAsUser
	}
	if uid == nil || *uid == 0 {
		t.Errorf("runAsUser %v; want a fixed non-zero uid (the key files on the nodes are chowned to it)", uid)
	}
	if cs.ReadOnlyRootFilesystem == nil || !*cs.ReadOnlyRootFilesystem {
		t.Error("readOnlyRootFilesystem is not true")
	}
	if cs.AllowPrivilegeEscalation == nil || *cs.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation is not false")
	}
	if cs.Privileged != nil && *cs.Privileged {
		t.Error("the container is privileged")
	}
	if cs.Capabilities == nil || !slices.Contains(cs.Capabilities.Drop, "ALL") {
		t.Error("capabilities do not drop ALL")
	} else if len(cs.Capabilities.Add) > 0 {
		t.Errorf("capabilities add %v; apid binds unprivileged ports only", cs.Capabilities.Add)
	}
	if f.pod.HostPID || f.pod.HostIPC {
		t.Error("hostPID or hostIPC is on")
	}

	r := f.c.Resources
	for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if q, ok := r.Requests[name]; !ok || q.IsZero() {
			t.Errorf("no %s request", name)
		}
	}
	if q, ok := r.Limits[corev1.ResourceMemory]; !ok || q.IsZero() {
		t.Error("no memory limit")
	}
}

func TestDisruptionBudget(t *testing.T) {
	f := setup(t)
	if len(f.m.pdbs) != 1 {
		t.Fatalf("%d PodDisruptionBudgets; want 1", len(f.m.pdbs))
	}
	pdb := f.m.pdbs[0]
	if mu := pdb.Spec.MaxUnavailable; mu == nil || *mu != intstr.FromInt32(1) {
		t.Errorf("PodDisruptionBudget %s: maxUnavailable %v; want 1", pdb.Name, mu)
	}
	if pdb.Spec.MinAvailable != nil {
		t.Errorf("PodDisruptionBudget %s sets minAvailable too", pdb.Name)
	}
	podLabels := labels.Set(f.ds.Spec.Template.Labels)
	for what, sel := range map[string]*metav1.LabelSelector{
		"PodDisruptionBudget " + pdb.Name: pdb.Spec.Selector,
		"DaemonSet " + f.ds.Name:          f.ds.Spec.Selector,
	} {
		if sel == nil || (len(sel.MatchLabels) == 0 && len(sel.MatchExpressions) == 0) {
			t.Errorf("%s has an empty selector, which matches every pod in the namespace", what)
			continue
		}
		s, err := metav1.LabelSelectorAsSelector(sel)
		if err != nil {
			t.Errorf("%s selector: %v", what, err)
			continue
		}
		if !s.Matches(podLabels) {
			t.Errorf("%s selector %s does not match the DaemonSet's pod labels %v", what, s, podLabels)
		}
	}
}
