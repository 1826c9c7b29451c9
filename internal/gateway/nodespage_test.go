package gateway

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
	"time"
)

// TestNodesPageJSON: the page written a node at a time is the JSON of the
// page, indented as before, whether empty, whole or with a next page.
func TestNodesPageJSON(t *testing.T) {
	at := time.Date(2026, 12, 4, 21, 0, 0, 0, time.UTC)
	nodes := []NodeStatus{
		{Node: "a", Connection: "ready", Calls: map[string]uint64{"OK": 3}, Inventory: &NodeInventory{Address: "10.0.0.1", Role: "worker", Labels: map[string]string{"rack": "r1"}}},
		{Node: "b\"<quoted>", Connection: "none", Calls: map[string]uint64{}},
	}
	for _, page := range []nodesPage{
		{Time: at, Total: 0},
		{Time: at, Total: 2, Nodes: nodes},
		{Time: at, Total: 9, Nodes: nodes[:1], Next: "a"},
	} {
		var got bytes.Buffer
		if err := page.writeJSON(&got); err != nil {
			t.Fatal(err)
		}
		want, _ := json.MarshalIndent(page, "", "  ")
		if page.Nodes == nil {
			// (Marshal writes a nil slice as null; the page says [].)
			want = bytes.Replace(want, []byte(`"nodes": null`), []byte(`"nodes": []`), 1)
		}
		if got.String() != string(want)+"\n" {
			t.Errorf("got\n%s\nwant\n%s", got.String(), want)
		}
		var back nodesPage
		if err := json.Unmarshal(got.Bytes(), &back); err != nil {
			t.Fatalf("%v\n%s", err, got.String())
		}
		if len(back.Nodes) != len(page.Nodes) || back.Next != page.Next || back.Total != page.Total || !back.Time.Equal(page.Time) ||
			(len(page.Nodes) > 0 && !reflect.DeepEqual(back.Nodes[0].Calls, page.Nodes[0].Calls)) {
			t.Errorf("read back %+v, want %+v", back, page)
		}
	}
}
