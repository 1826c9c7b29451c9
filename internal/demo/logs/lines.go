package logs

import (
	"bytes"

	"github.com/apid/apid/internal/demo/ring"
)

// Lines keeps the latest lines of a log; writing to it appends lines.
type Lines struct{ *ring.Ring[string] }

// NewLines returns a log that keeps the latest capacity lines.
func NewLines(capacity int) Lines { return Lines{ring.New[string](capacity)} }

// Write appends p as one or more lines, in one step for the readers;
// slog's handlers call it once per record.
func (l Lines) Write(p []byte) (int, error) {
	var lines []string
	for line := range bytes.Lines(p) {
		lines = append(lines, string(bytes.TrimRight(line, "\r\n")))
	}
	l.Append(lines...)
	return len(p), nil
}
