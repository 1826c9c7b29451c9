package gateway

import (
	"reflect"
	"strings"
)

// liveKeys are the configuration keys whose new values a reload applies to
// calls that start after it. Every other key (addresses, files, windows,
// transport settings) is read once at start and needs a restart.
var liveKeys = map[string]bool{
	"selfNames":                         true,
	"maxNodes":                          true,
	"nodeTimeout":                       true,
	"forwardMetadata":                   true,
	"serverStreamingMethods":            true,
	"clientStreamingMethods":            true,
	"bidiStreamingMethods":              true,
	"logLevel":                          true,
	"policy":                            true,
	"drainDelay":                        true,
	"shutdownTimeout":                   true,
	"ejection":                          true,
	"inventory":                         true,
	"health":                            true,
	"limits.bufferedBytes":              true,
	"limits.connections":                true,
	"limits.connectionsPerIdentity":     true,
	"limits.concurrentCallsPerIdentity": true,
	"limits.callsPerSecondPerIdentity":  true,
	"limits.callBurstPerIdentity":       true,
}

// reconcile compares next with cur key by key (by YAML name) and returns
// the changed keys that apply live and those that need a restart; for the
// latter it puts cur's value back into next, so next is what will run.
func reconcile(cur Config, next *Config) (live, restart []string) {
	compare(reflect.ValueOf(cur), reflect.ValueOf(next).Elem(), "", &live, &restart)
	return live, restart
}

var limitsType = reflect.TypeFor[LimitsConfig]()

func compare(cur, next reflect.Value, prefix string, live, restart *[]string) {
	t := cur.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		key := prefix + strings.Split(f.Tag.Get("yaml"), ",")[0]
		a, b := cur.Field(i), next.Field(i)
		if f.Type == limitsType {
			compare(a, b, key+".", live, restart)
			continue
		}
		if reflect.DeepEqual(a.Interface(), b.Interface()) {
			continue
		}
		if liveKeys[key] {
			*live = append(*live, key)
			continue
		}
		*restart = append(*restart, key)
		b.Set(a)
	}
}
