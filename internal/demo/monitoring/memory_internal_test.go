package monitoring

import (
	"os"
	"testing"
)

func TestParseMeminfoFillsEveryField(t *testing.T) {
	data, err := os.ReadFile("testdata/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	info, err := parseMeminfo(data)
	if err != nil {
		t.Fatal(err)
	}
	m := info.ProtoReflect()
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		if fd := fields.Get(i); !m.Has(fd) {
			t.Errorf("field %s not filled from the fixture", fd.Name())
		}
	}
	if info.GetMemtotal() != 1000 || info.GetSreclaimable() != 25024 || info.GetNfsunstable() != 30029 || info.GetDirectmap1G() != 53052 {
		t.Errorf("meminfo = %v", info)
	}
}

func TestParseMeminfoRejectsGarbage(t *testing.T) {
	for _, in := range []string{"", "hello\nworld\n", "MemTotal: lots kB\n", "NotAField: 12 kB\n"} {
		if _, err := parseMeminfo([]byte(in)); err == nil {
			t.Errorf("parseMeminfo(%q) succeeded", in)
		}
	}
}

func FuzzParseMeminfo(f *testing.F) {
	if data, err := os.ReadFile("testdata/meminfo"); err == nil {
		f.Add(data)
	}
	f.Add([]byte("MemTotal: 1 kB\nActive(anon):\n:\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		info, err := parseMeminfo(data)
		if err == nil && info == nil {
			t.Fatal("nil info without error")
		}
	})
}
