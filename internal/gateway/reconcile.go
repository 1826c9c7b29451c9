package gateway

import (
	"reflect"
	"strings"
)

// A key's reload rule is its field's reload tag, written beside the key in
// the package that owns it: "live" keys apply, on a reload, to calls that
// start after it (the section's Apply); "restart" keys (addresses, files,
// windows, transport settings) are read once at start. A struct field
// without the tag is a section whose own fields carry it; a key with none
// needs a restart (a test holds that every key has one).

// reconcile compares next with cur key by key (by YAML name) and returns
// the changed keys that apply live and those that need a restart; for the
// latter it puts cur's value back into next, so next is what will run.
func reconcile(cur Config, next *Config) (live, restart []string) {
	walkKeys(reflect.TypeFor[Config](), "", func(key string, index []int, rule string) {
		a, b := reflect.ValueOf(cur).FieldByIndex(index), reflect.ValueOf(next).Elem().FieldByIndex(index)
		if reflect.DeepEqual(a.Interface(), b.Interface()) {
			return
		}
		if rule == "live" {
			live = append(live, key)
			return
		}
		restart = append(restart, key)
		b.Set(a)
	})
	return live, restart
}

// walkKeys calls fn for every classified key of t (a configuration
// struct) with its path, its field index and its reload rule; a key
// without a rule is reported with rule "".
func walkKeys(t reflect.Type, prefix string, fn func(key string, index []int, rule string)) {
	walkFields(t, nil, prefix, fn)
}

func walkFields(t reflect.Type, parent []int, prefix string, fn func(string, []int, string)) {
	for i := range t.NumField() {
		f := t.Field(i)
		name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		index := append(append([]int(nil), parent...), i)
		rule, tagged := f.Tag.Lookup("reload")
		switch {
		case tagged:
			fn(prefix+name, index, rule)
		case opts == "inline" && f.Type.Kind() == reflect.Struct:
			walkFields(f.Type, index, prefix, fn)
		case f.Type.Kind() == reflect.Struct:
			walkFields(f.Type, index, prefix+name+".", fn)
		default:
			fn(prefix+name, index, "")
		}
	}
}
