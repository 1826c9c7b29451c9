package pki

import (
	"github.com/apid/apid/certs"

	"bytes"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"gopkg.in/yaml.v3"
)

// TalosContext is one context of a talosconfig file: where to connect and the
// credentials to connect with.
type TalosContext struct {
	// Endpoints are the addresses the client dials (a port is optional).
	Endpoints []string
	// Nodes are the default targets of requests; may be empty.
	Nodes []string
	// CA is the PEM of the CA(s) the client trusts.
	CA []byte
	// Crt and Key are the client's PEM certificate and private key.
	Crt, Key []byte
}

// Validate reports every problem with c: no endpoints, a CA that holds no
// certificate, or a certificate and key that do not form a pair.
func (c TalosContext) Validate() error {
	var errs []error

	if len(c.Endpoints) == 0 {
		errs = append(errs, errors.New("no endpoints"))
	}

	if _, err := certs.ParseCAPool(c.CA); err != nil {
		errs = append(errs, fmt.Errorf("ca: %w", err))
	}

	if _, err := tls.X509KeyPair(c.Crt, c.Key); err != nil {
		errs = append(errs, fmt.Errorf("crt/key: %w", err))
	}

	return errors.Join(errs...)
}

// TalosconfigMode says what WriteTalosconfig does with an existing file.
type TalosconfigMode int

const (
	// TalosconfigCreate writes a new file and refuses to replace one; the
	// error then wraps fs.ErrExist.
	TalosconfigCreate TalosconfigMode = iota
	// TalosconfigOverwrite replaces any existing file with one holding only
	// the new context.
	TalosconfigOverwrite
	// TalosconfigMerge adds the context to an existing file (replacing a
	// context of the same name) and makes it current; everything else in
	// the file is kept. A missing file is created.
	TalosconfigMerge
)

// WriteTalosconfig writes a talosconfig whose current context is contextName
// and holds c, as the Talos client reads it: certificates and key are stored
// base64-encoded. The file is written atomically with mode 0o600 (it holds a
// private key) and its directory is created if needed. Merging is a
// read-modify-write that does not lock against other writers.
func WriteTalosconfig(path, contextName string, c TalosContext, mode TalosconfigMode) error {
	if contextName == "" {
		return errors.New("write talosconfig: empty context name")
	}

	if err := c.Validate(); err != nil {
		return fmt.Errorf("write talosconfig %s: context %q: %w", path, contextName, err)
	}

	var existing []byte

	switch mode {
	case TalosconfigCreate, TalosconfigOverwrite:
	case TalosconfigMerge:
		// Merge into the real file rather than replacing a symlink to it.
		if resolved, err := filepath.EvalSymlinks(path); err == nil {
			path = resolved
		}

		b, err := os.ReadFile(path)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("write talosconfig: %w", err)
		}

		existing = b
	default:
		return fmt.Errorf("write talosconfig: unknown mode %d", mode)
	}

	data, err := MergeTalosconfig(existing, contextName, c)
	if err != nil {
		return fmt.Errorf("write talosconfig %s: %w", path, err)
	}

	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("write talosconfig: %w", err)
	}

	return WriteFile(path, data, 0o600, mode != TalosconfigCreate)
}

// talosContextYAML is the on-disk shape of a context, as the Talos client's
// config package reads it.
type talosContextYAML struct {
	Endpoints []string `yaml:"endpoints"`
	Nodes     []string `yaml:"nodes,omitempty"`
	CA        string   `yaml:"ca"`
	Crt       string   `yaml:"crt"`
	Key       string   `yaml:"key"`
}

// MergeTalosconfig returns the talosconfig existing with context contextName
// set to c and made current. Other contexts and unknown keys are kept as they
// are. An empty existing yields a new file holding only that context. c is
// not validated; WriteTalosconfig does that.
func MergeTalosconfig(existing []byte, contextName string, c TalosContext) ([]byte, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(existing, &doc); err != nil {
		return nil, fmt.Errorf("parse talosconfig: %w", err)
	}

	// The node tree accepts what any decoder refuses (duplicate keys, for
	// one); a file the Talos client cannot read is reported, not carried on.
	var probe struct {
		Context  any            `yaml:"context"`
		Contexts map[string]any `yaml:"contexts"`
	}

	if doc.Kind != 0 {
		if err := doc.Decode(&probe); err != nil {
			return nil, fmt.Errorf("parse talosconfig: %w", err)
		}
	}

	var root *yaml.Node

	if doc.Kind == yaml.DocumentNode && len(doc.Content) == 1 && !isNull(doc.Content[0]) {
		root = doc.Content[0]
		if root.Kind != yaml.MappingNode {
			return nil, errors.New("parse talosconfig: top level is not a mapping")
		}
	} else {
		root = &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
		doc = yaml.Node{Kind: yaml.DocumentNode, Content: []*yaml.Node{root}}
	}

	var ctx yaml.Node

	err := ctx.Encode(talosContextYAML{
		Endpoints: c.Endpoints,
		Nodes:     c.Nodes,
		CA:        base64.StdEncoding.EncodeToString(c.CA),
		Crt:       base64.StdEncoding.EncodeToString(c.Crt),
		Key:       base64.StdEncoding.EncodeToString(c.Key),
	})
	if err != nil {
		return nil, err
	}

	setKey(root, "context", &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: contextName})

	contexts := getKey(root, "contexts")

	switch {
	case contexts == nil || isNull(contexts):
		contexts = &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
		setKey(root, "contexts", contexts)
	case contexts.Kind != yaml.MappingNode:
		return nil, errors.New("parse talosconfig: contexts is not a mapping")
	}

	// The Talos client (v1.13) dereferences every context without checking
	// for null, so such a file would crash it; refuse to carry one along.
	for i := 0; i+1 < len(contexts.Content); i += 2 {
		if contexts.Content[i+1].Kind != yaml.MappingNode {
			return nil, fmt.Errorf("parse talosconfig: context %q is not a mapping", contexts.Content[i].Value)
		}
	}

	// An empty mapping may have been read in flow style ("contexts: {}");
	// the merged one reads better in block style.
	contexts.Style &^= yaml.FlowStyle

	setKey(contexts, contextName, &ctx)

	spellFlowNulls(&doc, false)

	var buf bytes.Buffer

	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)

	if err := enc.Encode(&doc); err != nil {
		return nil, err
	}

	if err := enc.Close(); err != nil {
		return nil, err
	}

	return buf.Bytes(), nil
}

// spellFlowNulls works around yaml.v3 writing an empty null inside a flow
// collection ("{basic}") back as a quoted empty string, which changes its
// meaning; spelled out as null it survives.
func spellFlowNulls(n *yaml.Node, inFlow bool) {
	if inFlow && isNull(n) && n.Value == "" {
		n.Value = "null"
	}

	inFlow = inFlow || n.Style&yaml.FlowStyle != 0

	for _, c := range n.Content {
		spellFlowNulls(c, inFlow)
	}
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null"
}

func getKey(m *yaml.Node, key string) *yaml.Node {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}

	return nil
}

func setKey(m *yaml.Node, key string, value *yaml.Node) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			m.Content[i+1] = value

			return
		}
	}

	m.Content = append(m.Content,
		&yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: key},
		value,
	)
}
