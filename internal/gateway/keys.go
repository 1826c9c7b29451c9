package gateway

import (
	"fmt"
	"reflect"
	"strings"

	"gopkg.in/yaml.v3"
)

// unknownKeys lists the keys of node (a YAML document read into t) that t
// has no field for, each by its full path with its line and, when one is
// close, the key that was probably meant. The decoder's own message names
// a Go type and no path.
func unknownKeys(node *yaml.Node, t reflect.Type, path string) []error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch {
	case node.Kind == yaml.DocumentNode && len(node.Content) > 0:
		return unknownKeys(node.Content[0], t, path)
	case node.Kind == yaml.SequenceNode && t.Kind() == reflect.Slice:
		var errs []error
		for i, item := range node.Content {
			errs = append(errs, unknownKeys(item, t.Elem(), fmt.Sprintf("%s[%d]", path, i))...)
		}
		return errs
	case node.Kind == yaml.MappingNode && t.Kind() == reflect.Map:
		var errs []error
		for i := 0; i+1 < len(node.Content); i += 2 {
			errs = append(errs, unknownKeys(node.Content[i+1], t.Elem(), join(path, node.Content[i].Value))...)
		}
		return errs
	case node.Kind != yaml.MappingNode || t.Kind() != reflect.Struct:
		return nil // a scalar, or a shape the decoder itself will refuse
	}
	fields := yamlFields(t)
	var errs []error
	for i := 0; i+1 < len(node.Content); i += 2 {
		k := node.Content[i]
		if ft, ok := fields[k.Value]; ok {
			errs = append(errs, unknownKeys(node.Content[i+1], ft, join(path, k.Value))...)
			continue
		}
		msg := fmt.Sprintf("line %d: %s is not a configuration key", k.Line, join(path, k.Value))
		if now, ok := renamedKeys[join(path, k.Value)]; ok {
			msg += fmt.Sprintf(": it was renamed %s (%s): rename it", now.key, now.why)
		} else if s := suggest(k.Value, fields); s != "" {
			msg += fmt.Sprintf(": did you mean %s?", join(path, s))
		} else if elsewhere := findKey(reflect.TypeFor[Config](), "", k.Value); elsewhere != "" && elsewhere != join(path, k.Value) {
			msg += fmt.Sprintf(": did you mean %s?", elsewhere)
		}
		errs = append(errs, fmt.Errorf("%s", msg))
	}
	return errs
}

// renamedKeys are keys of earlier versions and what they became, so that
// an old file says what to rename.
var renamedKeys = map[string]struct{ key, why string }{
	"metricsListen": {"adminListen", "the endpoint serves /healthz, /readyz and /nodes besides /metrics"},
}

// yamlFields maps the YAML keys of struct t, inline sections included, to
// their types.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := range t.NumField() {
		f := t.Field(i)
		name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if opts == "inline" {
			for k, v := range yamlFields(f.Type) {
				out[k] = v
			}
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		out[name] = f.Type
	}
	return out
}

// findKey returns the full path of a key named like key (ignoring case)
// anywhere in the sections of t, or "".
func findKey(t reflect.Type, path, key string) string {
	for name, ft := range yamlFields(t) {
		if strings.EqualFold(name, key) {
			return join(path, name)
		}
		if ft.Kind() == reflect.Struct {
			if found := findKey(ft, join(path, name), key); found != "" {
				return found
			}
		}
	}
	return ""
}

// suggest returns the key of fields closest to key when it is close enough
// to be a typo, or "".
func suggest(key string, fields map[string]reflect.Type) string {
	best, bestDist := "", max(2, len(key)/4)+1
	for name := range fields {
		d := editDistance(strings.ToLower(key), strings.ToLower(name))
		if d < bestDist || (d == bestDist && name < best) {
			best, bestDist = name, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance of a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// emptyValues lists the keys of node written with no value (localOnly:
// and nothing after it). YAML reads such a key as null, which the decoder
// takes as the zero value: a file cut inside a value (a writer that died)
// would then turn localOnly or nodeNetworks off without a word. A key is
// written with a value, or left out for its default.
func emptyValues(node *yaml.Node, path string) []error {
	switch node.Kind {
	case yaml.DocumentNode:
		var errs []error
		for _, c := range node.Content {
			errs = append(errs, emptyValues(c, path)...)
		}
		return errs
	case yaml.SequenceNode:
		var errs []error
		for i, item := range node.Content {
			errs = append(errs, emptyValues(item, fmt.Sprintf("%s[%d]", path, i))...)
		}
		return errs
	case yaml.MappingNode:
		var errs []error
		for i := 0; i+1 < len(node.Content); i += 2 {
			k, v := node.Content[i], node.Content[i+1]
			key := join(path, k.Value)
			if v.Kind == yaml.ScalarNode && v.Tag == "!!null" {
				errs = append(errs, fmt.Errorf("line %d: %s has no value: write one, or leave the key out for its default", k.Line, key))
				continue
			}
			errs = append(errs, emptyValues(v, key)...)
		}
		return errs
	}
	return nil
}

// valueKeys maps the line of each value of node to its key's full path,
// for errors that name a line only (the first key wins on a line that
// holds several).
func valueKeys(node *yaml.Node, path string) map[int]string {
	out := map[int]string{}
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.DocumentNode:
			for _, c := range n.Content {
				walk(c, path)
			}
		case yaml.SequenceNode:
			for i, item := range n.Content {
				walk(item, fmt.Sprintf("%s[%d]", path, i))
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				key := join(path, k.Value)
				if _, seen := out[v.Line]; !seen && v.Kind == yaml.ScalarNode {
					out[v.Line] = key
				}
				walk(v, key)
			}
		}
	}
	walk(node, path)
	return out
}
