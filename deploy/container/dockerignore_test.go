// Package container holds apid's Dockerfile; its tests check the Dockerfile
// and the top-level .dockerignore without a Docker daemon.
package container

import (
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const (
	dockerfile   = "Dockerfile"
	dockerignore = "../../.dockerignore"
	binary       = "bin/apid-static"
)

// ignoreRule is one line of a .dockerignore.
type ignoreRule struct {
	pattern  []string // path segments; "**" stands for any number of them
	negated  bool     // "!": the path is sent after all
	original string
}

// parseIgnore reads .dockerignore rules the way Docker does: blank lines and
// '#' comments are skipped, surrounding space is trimmed, a leading '!'
// negates, and the pattern is cleaned, with a leading '/' dropped (the
// context's root is the only root).
func parseIgnore(text string) ([]ignoreRule, error) {
	var rules []ignoreRule
	for n, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		r := ignoreRule{original: line}
		if strings.HasPrefix(line, "!") {
			r.negated = true
			line = strings.TrimSpace(line[1:])
		}
		p := strings.TrimPrefix(path.Clean(filepath.ToSlash(line)), "/")
		if p == "" || p == "." {
			return nil, fmt.Errorf("line %d: empty pattern %q", n+1, r.original)
		}
		r.pattern = strings.Split(p, "/")
		for _, seg := range r.pattern {
			if seg != "**" && strings.Contains(seg, "**") {
				return nil, fmt.Errorf("line %d: %q: this checker supports ** only as a whole segment", n+1, r.original)
			}
			if _, err := path.Match(seg, ""); err != nil {
				return nil, fmt.Errorf("line %d: %q: %v", n+1, r.original, err)
			}
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// matchSegments matches path segments against pattern segments: each
// pattern segment as path.Match does ('*' never crosses a '/'), and "**"
// as zero or more whole segments.
func matchSegments(pattern, name []string) bool {
	if len(pattern) == 0 {
		return len(name) == 0
	}
	if pattern[0] == "**" {
		for i := 0; i <= len(name); i++ {
			if matchSegments(pattern[1:], name[i:]) {
				return true
			}
		}
		return false
	}
	if len(name) == 0 {
		return false
	}
	ok, _ := path.Match(pattern[0], name[0])
	return ok && matchSegments(pattern[1:], name[1:])
}

// matches reports whether the rule's pattern matches p or one of its parent
// directories (excluding a directory excludes what is in it).
func (r ignoreRule) matches(p string) bool {
	segs := strings.Split(p, "/")
	for i := len(segs); i > 0; i-- {
		if matchSegments(r.pattern, segs[:i]) {
			return true
		}
	}
	return false
}

// excluded applies the rules to a path relative to the context's root: the
// last rule that matches decides; no match means the path is sent.
func excluded(rules []ignoreRule, p string) bool {
	p = strings.TrimPrefix(path.Clean(p), "/")
	out := false
	for _, r := range rules {
		if r.matches(p) {
			out = !r.negated
		}
	}
	return out
}

// TestIgnoreSemantics checks the matcher against Docker's documented
// behaviour, so that the checks on the real file mean what they say.
func TestIgnoreSemantics(t *testing.T) {
	for _, tc := range []struct {
		rules    string
		path     string
		excluded bool
	}{
		// The .dockerignore reference's example: the last match wins.
		{"*.md\n!README*.md\nREADME-secret.md", "README.md", false},
		{"*.md\n!README*.md\nREADME-secret.md", "README-secret.md", true},
		{"*.md\n!README*.md\nREADME-secret.md", "CHANGES.md", true},
		{"*.md\nREADME-secret.md\n!README*.md", "README-secret.md", false},
		// '*' stays within a segment; "**" spans any number of them.
		{"*.md", "docs/a.md", false},
		{"*/temp*", "somedir/temporary.txt", true},
		{"*/*/temp*", "somedir/subdir/temporary.txt", true},
		{"*/*/temp*", "somedir/temporary.txt", false},
		{"temp?", "tempa", true},
		{"temp?", "tempab", false},
		{"**/*.go", "main.go", true},
		{"**/*.go", "a/b/c.go", true},
		{"a/**/c", "a/c", true},
		{"a/**/c", "a/x/y/c", true},
		// A directory's rule covers its contents; a leading '/' is the root.
		{"foo", "foo/bar/baz", true},
		{"/foo", "foo/bar", true},
		{"foo/", "foo/bar", true},
		{"bar", "foo/bar", false},
		// Nothing matches: sent. Comments and blank lines are not rules.
		{"# *\n\n", "anything", false},
		// Everything out, one file back in.
		{"*\n!bin/x", "bin/x", false},
		{"*\n!bin/x", "bin/y", true},
		{"*\n!bin/x", "go.mod", true},
	} {
		rules, err := parseIgnore(tc.rules)
		if err != nil {
			t.Fatalf("%q: %v", tc.rules, err)
		}
		if got := excluded(rules, tc.path); got != tc.excluded {
			t.Errorf("rules %q, path %s: excluded %v; want %v", tc.rules, tc.path, got, tc.excluded)
		}
	}
	if _, err := parseIgnore("a**b"); err == nil {
		t.Error("a ** inside a segment was accepted")
	}
}

// mustStayOut are context paths that must never reach the builder.
var mustStayOut = []string{
	"apid-demo/ca.key", "apid-demo/ca.crt", "apid-demo/talosconfig",
	"x/apid-demo/node.crt", ".demo/cp-1.key",
	"ca.key", "node.key", "bin/node.key", "etc/apid/cp-1.key", "deep/down/client.key",
	"bin/apid-static.key", "key.pem", "pki/node-key.pem",
	"talosconfig", "home/.talos/talosconfig", ".talosconfig",
	".git/config", ".git/HEAD", "sub/.git/config",
}

// checkIgnore returns what is wrong with the given .dockerignore text.
func checkIgnore(text string, mustBeSent []string) []string {
	rules, err := parseIgnore(text)
	if err != nil {
		return []string{err.Error()}
	}
	var problems []string
	for _, p := range mustStayOut {
		if !excluded(rules, p) {
			problems = append(problems, "sends "+p)
		}
	}
	// The rules after the last '!' keep these paths out on their own, so
	// that letting more in later (say "!bin") cannot let a key in too.
	tail := rules
	for i, r := range rules {
		if r.negated {
			tail = rules[i+1:]
		}
	}
	for _, p := range mustStayOut {
		if !excluded(tail, p) {
			problems = append(problems, "keeps out "+p+" only by the rules before its last '!' line")
		}
	}
	for _, p := range mustBeSent {
		if excluded(rules, p) {
			problems = append(problems, "keeps out "+p+", which the image needs")
		}
	}
	// The image needs one file; anything else in the context is noise at
	// best and a leak at worst.
	for _, p := range []string{"go.mod", "cmd/apid/main.go", "README.md", "bin/apid", "deploy/apid.yaml"} {
		if !excluded(rules, p) {
			problems = append(problems, "sends "+p+", which the image does not need")
		}
	}
	return problems
}

func TestDockerignore(t *testing.T) {
	data, err := os.ReadFile(dockerignore)
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	ins, _ := readDockerfile(t)
	sent := copySources(ins)
	if !slices.Contains(sent, binary) {
		t.Fatalf("the Dockerfile copies %v, not %s", sent, binary)
	}
	for _, p := range checkIgnore(text, sent) {
		t.Errorf(".dockerignore %s", p)
	}

	// The checks can fail: each of these edits must be caught.
	for name, edited := range map[string]string{
		"keys let back in":    text + "\n!**/*.key\n",
		"everything let in":   text + "\n!*\n",
		"binary kept out":     text + "\nbin\n",
		"key rule before '!'": strings.Replace(strings.Replace(text, "**/*.key\n", "", 1), "*\n", "*\n**/*.key\n", 1),
		"no key rule":         strings.Replace(text, "**/*.key\n", "", 1),
		"only root keys kept": strings.Replace(text, "**/*.key\n", "*.key\n", 1),
	} {
		if edited == text {
			t.Errorf("%s: the edit did not apply; update this control to the file", name)
			continue
		}
		if len(checkIgnore(edited, sent)) == 0 {
			t.Errorf("%s: not caught", name)
		}
	}
}

// instruction is one Dockerfile instruction.
type instruction struct {
	cmd  string // upper case
	args string
}

// readDockerfile returns the Dockerfile's instructions, with continuation
// lines joined and comments dropped, and its full text.
func readDockerfile(t *testing.T) ([]instruction, string) {
	t.Helper()
	data, err := os.ReadFile(dockerfile)
	if err != nil {
		t.Fatal(err)
	}
	var ins []instruction
	var cur strings.Builder
	for _, line := range strings.Split(string(data), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && cur.Len() == 0) {
			continue
		}
		if strings.HasSuffix(trimmed, "\\") {
			cur.WriteString(strings.TrimSuffix(trimmed, "\\") + " ")
			continue
		}
		cur.WriteString(trimmed)
		full := strings.TrimSpace(cur.String())
		cur.Reset()
		if full == "" {
			continue
		}
		cmd, args, _ := strings.Cut(full, " ")
		ins = append(ins, instruction{strings.ToUpper(cmd), strings.TrimSpace(args)})
	}
	return ins, string(data)
}

// copySources lists the context paths COPY and ADD read.
func copySources(ins []instruction) []string {
	var srcs []string
	for _, in := range ins {
		if in.cmd != "COPY" && in.cmd != "ADD" {
			continue
		}
		fields := strings.Fields(in.args)
		for len(fields) > 0 && strings.HasPrefix(fields[0], "--") {
			if strings.HasPrefix(fields[0], "--from") {
				fields = nil // from another stage or image, not the context
				break
			}
			fields = fields[1:]
		}
		if len(fields) < 2 {
			continue
		}
		srcs = append(srcs, fields[:len(fields)-1]...)
	}
	return srcs
}

// execForm decodes a JSON-array (exec form) argument.
func execForm(t *testing.T, in instruction) []string {
	t.Helper()
	var v []string
	if err := json.Unmarshal([]byte(in.args), &v); err != nil {
		t.Errorf("%s %s is not in exec form (a JSON array); scratch has no shell for the shell form", in.cmd, in.args)
	}
	return v
}

func TestDockerfile(t *testing.T) {
	ins, text := readDockerfile(t)
	last := map[string]instruction{}
	for _, in := range ins {
		last[in.cmd] = in
		switch in.cmd {
		case "FROM":
			if f := strings.Fields(in.args); len(f) == 0 || f[0] != "scratch" {
				t.Errorf("FROM %s: want scratch only, so that no base image is downloaded", in.args)
			}
		case "RUN":
			t.Errorf("RUN %s: scratch has no shell", in.args)
		case "ADD":
			t.Errorf("ADD %s: use COPY; ADD fetches URLs and unpacks archives", in.args)
		}
	}
	if _, ok := last["FROM"]; !ok {
		t.Fatal("no FROM")
	}
	if u := last["USER"].args; u != "65532:65532" {
		t.Errorf("USER %q; want 65532:65532", u)
	}
	if e := strings.Fields(last["EXPOSE"].args); !slices.Contains(e, "50000") && !slices.Contains(e, "50000/tcp") {
		t.Errorf("EXPOSE %v lacks 50000", e)
	}
	if ep := execForm(t, last["ENTRYPOINT"]); !slices.Equal(ep, []string{"/apid"}) {
		t.Errorf("ENTRYPOINT %q; want [\"/apid\"]", ep)
	}
	if cmd := execForm(t, last["CMD"]); !slices.Equal(cmd, []string{"serve", "-config", "/etc/apid/apid.yaml"}) {
		t.Errorf("CMD %q; want serve -config /etc/apid/apid.yaml", cmd)
	}
	// The binary lands where ENTRYPOINT runs it.
	found := false
	for _, in := range ins {
		if f := strings.Fields(in.args); in.cmd == "COPY" && len(f) == 2 && f[0] == binary && f[1] == "/apid" {
			found = true
		}
	}
	if !found {
		t.Errorf("no COPY %s /apid", binary)
	}
	// The comment at the top tells how to build what COPY needs.
	for _, want := range []string{
		"CGO_ENABLED=0 go build -trimpath -o " + binary + " ./cmd/apid",
		"docker build -f deploy/container/Dockerfile",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("the Dockerfile's comment does not show %q", want)
		}
	}
}
