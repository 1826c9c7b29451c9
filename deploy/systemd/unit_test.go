// Package systemd holds the systemd unit and sysusers file for apid; its
// tests check their contents and, where the systemd tools are installed, let
// systemd itself judge them.
package systemd

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

const (
	unitFile     = "apid.service"
	sysusersFile = "apid.sysusers"
	// installedBinary is where the unit expects apid; the verify tests put a
	// real executable in its place.
	installedBinary = "/usr/local/bin/apid"
)

// unit is a parsed unit file: section -> key -> every assignment in order.
type unit map[string]map[string][]string

// last returns the effective value of a single-valued setting and whether it
// is set at all.
func (u unit) last(section, key string) (string, bool) {
	vs := u[section][key]
	if len(vs) == 0 {
		return "", false
	}
	return vs[len(vs)-1], true
}

// parseUnit reads systemd's unit syntax: [Section] headers, Key=Value lines,
// '#' and ';' comments, and a trailing backslash continuing a line.
func parseUnit(text string) (unit, error) {
	u := unit{}
	section := ""
	var pending strings.Builder
	lines := strings.Split(text, "\n")
	for i := 0; i < len(lines); i++ {
		line := strings.TrimSpace(lines[i])
		if pending.Len() == 0 && (line == "" || line[0] == '#' || line[0] == ';') {
			continue
		}
		if strings.HasSuffix(line, "\\") {
			pending.WriteString(strings.TrimSuffix(line, "\\"))
			pending.WriteByte(' ')
			continue
		}
		pending.WriteString(line)
		line = strings.TrimSpace(pending.String())
		pending.Reset()
		if strings.HasPrefix(line, "[") {
			if !strings.HasSuffix(line, "]") {
				return nil, fmt.Errorf("line %d: bad section header %q", i+1, line)
			}
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("line %d: no '=' in %q", i+1, line)
		}
		if section == "" {
			return nil, fmt.Errorf("line %d: assignment before any section", i+1)
		}
		key = strings.TrimSpace(key)
		u[section][key] = append(u[section][key], strings.TrimSpace(value))
	}
	if pending.Len() > 0 {
		return nil, errors.New("file ends in a line continuation")
	}
	return u, nil
}

var spanUnits = map[string]time.Duration{
	"us": time.Microsecond, "usec": time.Microsecond,
	"ms": time.Millisecond, "msec": time.Millisecond,
	"s": time.Second, "sec": time.Second, "second": time.Second, "seconds": time.Second,
	"m": time.Minute, "min": time.Minute, "minute": time.Minute, "minutes": time.Minute,
	"h": time.Hour, "hr": time.Hour, "hour": time.Hour, "hours": time.Hour,
}

var spanPart = regexp.MustCompile(`^([0-9]+)\s*([a-z]*)`)

// parseTimeSpan reads a systemd time span such as "45", "45s" or "1min 30s";
// a bare number is seconds.
func parseTimeSpan(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "infinity" {
		return 0, fmt.Errorf("time span %q has no finite value", s)
	}
	var total time.Duration
	for rest := s; rest != ""; rest = strings.TrimSpace(rest) {
		m := spanPart.FindStringSubmatch(rest)
		if m == nil {
			return 0, fmt.Errorf("bad time span %q", s)
		}
		n, err := strconv.ParseInt(m[1], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("bad time span %q: %v", s, err)
		}
		unitLen := time.Second
		if m[2] != "" {
			var ok bool
			if unitLen, ok = spanUnits[m[2]]; !ok {
				return 0, fmt.Errorf("bad time span %q: unit %q", s, m[2])
			}
		}
		total += time.Duration(n) * unitLen
		rest = rest[len(m[0]):]
	}
	return total, nil
}

func TestParseTimeSpan(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"45": 45 * time.Second, "45s": 45 * time.Second, "1min 30s": 90 * time.Second,
		"2m": 2 * time.Minute, "500ms": 500 * time.Millisecond,
	} {
		if got, err := parseTimeSpan(in); err != nil || got != want {
			t.Errorf("parseTimeSpan(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "infinity", "forty", "45 fortnights"} {
		if _, err := parseTimeSpan(in); err == nil {
			t.Errorf("parseTimeSpan(%q) succeeded", in)
		}
	}
}

func readUnit(t *testing.T) (string, unit) {
	t.Helper()
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	u, err := parseUnit(string(b))
	if err != nil {
		t.Fatalf("%s: %v", unitFile, err)
	}
	return string(b), u
}

// TestUnitProperties checks the settings apid's behaviour depends on.
func TestUnitProperties(t *testing.T) {
	_, u := readUnit(t)

	want := map[string]string{
		// apid speaks sd_notify from its main process.
		"Type":         "notify",
		"NotifyAccess": "main",
		"User":         "apid",
		"Group":        "apid",
		"Restart":      "always",
		// Hardening that must not quietly disappear.
		"NoNewPrivileges":         "yes",
		"CapabilityBoundingSet":   "",
		"ProtectSystem":           "strict",
		"ProtectHome":             "yes",
		"PrivateTmp":              "yes",
		"PrivateDevices":          "yes",
		"ProtectKernelTunables":   "yes",
		"ProtectKernelModules":    "yes",
		"ProtectKernelLogs":       "yes",
		"ProtectControlGroups":    "yes",
		"ProtectClock":            "yes",
		"ProtectHostname":         "yes",
		"ProtectProc":             "invisible",
		"RestrictNamespaces":      "yes",
		"RestrictRealtime":        "yes",
		"RestrictSUIDSGID":        "yes",
		"LockPersonality":         "yes",
		"MemoryDenyWriteExecute":  "yes",
		"SystemCallArchitectures": "native",
		"SystemCallErrorNumber":   "EPERM",
		"UMask":                   "0077",
	}
	for key, value := range want {
		got, ok := u.last("Service", key)
		if !ok {
			t.Errorf("[Service] %s is not set; want %q", key, value)
		} else if got != value {
			t.Errorf("[Service] %s=%s; want %q", key, got, value)
		}
	}

	start, _ := u.last("Service", "ExecStart")
	if !strings.HasPrefix(start, installedBinary+" serve ") || !strings.Contains(start, "-config /etc/apid/apid.yaml") {
		t.Errorf("ExecStart=%s; want %s serve -config /etc/apid/apid.yaml", start, installedBinary)
	}

	// Several ExecReload lines run in order; the signal must be the last
	// step, after anything that may veto the reload.
	reload, _ := u.last("Service", "ExecReload")
	if reload != "/bin/kill -HUP $MAINPID" {
		t.Errorf("last ExecReload=%q; want /bin/kill -HUP $MAINPID", reload)
	}

	// drainDelay (5s) + shutdownTimeout (30s) + a margin.
	stop, ok := u.last("Service", "TimeoutStopSec")
	if !ok {
		t.Error("TimeoutStopSec is not set; the default 90s hides a hung stop")
	} else if d, err := parseTimeSpan(stop); err != nil {
		t.Errorf("TimeoutStopSec: %v", err)
	} else if d < 40*time.Second {
		t.Errorf("TimeoutStopSec=%s (%v); apid may take drainDelay+shutdownTimeout = 35s plus a margin, want >= 40s", stop, d)
	}
	if sig, ok := u.last("Service", "KillSignal"); ok && sig != "SIGTERM" && sig != "TERM" && sig != "15" {
		t.Errorf("KillSignal=%s; apid drains on SIGTERM", sig)
	}

	filters := strings.Join(u["Service"]["SystemCallFilter"], " ")
	if !strings.Contains(filters, "@system-service") {
		t.Errorf("SystemCallFilter lines %q do not allow @system-service", filters)
	}

	// What apid needs to keep: unix sockets (node agent, sd_notify), TCP,
	// the host network, and /proc/meminfo (its default buffer limit).
	families := strings.Fields(strings.Join(u["Service"]["RestrictAddressFamilies"], " "))
	for _, fam := range []string{"AF_UNIX", "AF_INET", "AF_INET6"} {
		if !contains(families, fam) {
			t.Errorf("RestrictAddressFamilies %v lacks %s", families, fam)
		}
	}
	if contains(families, "~AF_UNIX") || (len(families) > 0 && strings.HasPrefix(families[0], "~")) {
		t.Errorf("RestrictAddressFamilies %v is a deny list; want an allow list", families)
	}
	if v, _ := u.last("Service", "PrivateNetwork"); v == "yes" || v == "true" {
		t.Error("PrivateNetwork=yes cuts apid off from the other nodes")
	}
	if v, _ := u.last("Service", "ProcSubset"); v == "pid" {
		t.Error("ProcSubset=pid hides /proc/meminfo, which apid reads")
	}

	// The user the unit runs as is the one the sysusers file creates.
	user, _ := u.last("Service", "User")
	if got := sysusersUsers(t); !contains(got, user) {
		t.Errorf("%s creates users %v, not the unit's User=%s", sysusersFile, got, user)
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// sysusersUsers lists the names of the 'u' lines in the sysusers file.
func sysusersUsers(t *testing.T) []string {
	t.Helper()
	f, err := os.Open(sysusersFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var users []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "u" {
			users = append(users, fields[1])
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return users
}

// lookTool finds one of systemd's tools or skips the test.
func lookTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s is not installed", name)
	}
	return path
}

// standIn returns a real executable to put where the unit expects apid:
// systemd-analyze verify only checks that each Exec path is an executable
// file, never runs it, so this test's own binary serves.
func standIn(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if exe, err = filepath.EvalSymlinks(exe); err != nil {
		t.Fatal(err)
	}
	return exe
}

// render returns the unit text with apid's installed path replaced by exe.
func render(t *testing.T, text, exe string) string {
	t.Helper()
	if !strings.Contains(text, installedBinary) {
		t.Fatalf("%s never names %s", unitFile, installedBinary)
	}
	return strings.ReplaceAll(text, installedBinary, exe)
}

// verify writes text as apid.service in a new directory, runs
// `systemd-analyze verify` on it and returns the output lines about that
// unit (a line names its file or the unit), the whole output, and whether
// the command failed. Lines about other units on the machine are not ours.
func verify(t *testing.T, analyze, text string) (problems []string, output string, failed error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), unitFile)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(analyze, "verify", "--man=no", path)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0", "SYSTEMD_PAGER=", "SYSTEMD_LOG_LEVEL=info", "LC_ALL=C")
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	failed = cmd.Run()
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.Contains(line, path) || strings.Contains(line, unitFile) {
			problems = append(problems, line)
		}
	}
	return problems, out.String(), failed
}

// TestVerify has systemd itself load the unit. It runs without systemd as
// PID 1 (verify starts a manager in test mode), as root or not, and needs
// the distribution's unit directory for the default dependencies
// (sysinit.target, basic.target, shutdown.target), a real executable at
// every Exec path, and /bin/kill.
func TestVerify(t *testing.T) {
	analyze := lookTool(t, "systemd-analyze")
	exe := standIn(t)
	text, _ := readUnit(t)
	rendered := render(t, text, exe)

	// A minimal unit must pass, or this machine cannot judge units at all
	// and a failure below would say nothing about apid.service.
	if problems, out, err := verify(t, analyze, "[Service]\nExecStart="+exe+"\n"); err != nil || len(problems) > 0 {
		t.Fatalf("systemd-analyze verify rejects even a minimal unit here (err %v):\n%s", err, out)
	}

	problems, out, err := verify(t, analyze, rendered)
	if err != nil || len(problems) > 0 {
		t.Errorf("systemd-analyze verify %s: err %v, about our unit:\n%s\nfull output:\n%s",
			unitFile, err, strings.Join(problems, "\n"), out)
	}

	// The checks above must be able to fail: copies with an unknown key, a
	// bad value and a missing executable are each reported.
	for name, broken := range map[string]string{
		"unknown key": strings.Replace(rendered, "[Service]\n", "[Service]\nNoSuchSetting=1\n", 1),
		"bad value":   strings.Replace(rendered, "ProtectClock=yes", "ProtectClock=maybe", 1),
		"bad command": strings.Replace(rendered, "ExecStart="+exe, "ExecStart=/nonexistent/apid", 1),
	} {
		if broken == rendered {
			t.Errorf("%s: the edit did not apply; update this control to the file", name)
			continue
		}
		if problems, out, err := verify(t, analyze, broken); err == nil && len(problems) == 0 {
			t.Errorf("%s: systemd-analyze verify reported nothing for a broken unit:\n%s", name, out)
		}
	}
}

var exposure = regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`)

// TestSecurityExposure asks systemd-analyze to score the hardening, offline,
// and fails above 2.0 of 10 (the unit scores about 1.2 on systemd 252).
func TestSecurityExposure(t *testing.T) {
	analyze := lookTool(t, "systemd-analyze")
	text, _ := readUnit(t)
	path := filepath.Join(t.TempDir(), unitFile)
	if err := os.WriteFile(path, []byte(render(t, text, standIn(t))), 0o644); err != nil {
		t.Fatal(err)
	}
	// --threshold is in tenths: 20 is an exposure of 2.0.
	cmd := exec.Command(analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", path)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0", "SYSTEMD_COLORS=0", "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	m := exposure.FindSubmatch(out)
	if m == nil {
		if bytes.Contains(out, []byte("unrecognized option")) || bytes.Contains(out, []byte("Unknown option")) {
			t.Skipf("this systemd-analyze cannot score a unit offline (needs systemd 250):\n%s", out)
		}
		t.Fatalf("systemd-analyze security: no score (err %v):\n%s", err, out)
	}
	t.Logf("exposure %s", m[1])
	if err != nil {
		t.Errorf("systemd-analyze security: exposure %s is above 2.0 (err %v):\n%s", m[1], err, out)
	}
}

// TestSysusers has systemd-sysusers create the user in an empty root.
func TestSysusers(t *testing.T) {
	sysusers := lookTool(t, "systemd-sysusers")
	abs, err := filepath.Abs(sysusersFile)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	if err := os.Mkdir(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sysusers, "--root="+root, abs)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0", "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		if os.Geteuid() != 0 {
			t.Skipf("systemd-sysusers failed as a non-root user (%v):\n%s", err, out)
		}
		t.Fatalf("systemd-sysusers: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, abs) {
			t.Errorf("systemd-sysusers complains about %s: %s", sysusersFile, line)
		}
	}
	passwd, err := os.ReadFile(filepath.Join(root, "etc", "passwd"))
	if err != nil {
		t.Fatal(err)
	}
	var entry []string
	for _, line := range strings.Split(string(passwd), "\n") {
		if f := strings.Split(line, ":"); len(f) == 7 && f[0] == "apid" {
			entry = f
		}
	}
	if entry == nil {
		t.Fatalf("no apid user in the passwd systemd-sysusers wrote:\n%s\n%s", passwd, out)
	}
	if uid, err := strconv.Atoi(entry[2]); err != nil || uid == 0 || uid >= 1000 {
		t.Errorf("apid has uid %s; want a system uid (1..999)", entry[2])
	}
	if !strings.HasSuffix(entry[6], "nologin") {
		t.Errorf("apid's shell is %s; want nologin", entry[6])
	}
	group, err := os.ReadFile(filepath.Join(root, "etc", "group"))
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^apid:x:[0-9]+:`).Match(group) {
		t.Errorf("no apid group in the group file systemd-sysusers wrote:\n%s", group)
	}
}
