package identity

import (
	"os"
	"regexp"
	"testing"
)

// TestFallbackMachineryVersion keeps the version used without build
// information equal to go.mod's.
func TestFallbackMachineryVersion(t *testing.T) {
	mod, err := os.ReadFile("../../../go.mod")
	if err != nil {
		t.Skipf("no go.mod: %v", err)
	}
	m := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(machineryModule) + ` (v\S+)`).FindSubmatch(mod)
	if m == nil {
		t.Fatalf("go.mod does not require %s", machineryModule)
	}
	if string(m[1]) != fallbackMachineryVersion {
		t.Errorf("fallbackMachineryVersion = %q, go.mod has %q", fallbackMachineryVersion, m[1])
	}
}
