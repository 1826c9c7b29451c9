package lifecycle

import (
	"encoding/base32"
	"encoding/binary"
	"fmt"
	"strings"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/apid/apid/internal/demo/ring"
)

const (
	// eventCapacity bounds the agent's event log: the oldest event is
	// overwritten by the 1,001st.
	eventCapacity = 1000

	// eventTypePrefix and a payload's full message name make an event's type
	// URL, e.g. "talos/runtime/machine.SequenceEvent". Talos' client decodes
	// an event only when the type URL is exactly of this form, and
	// EventsWatchV2 ends its watch on any other, so the agent publishes only
	// the payload types that client knows (sequence, phase, task, service
	// state and machine status events).
	eventTypePrefix = "talos/runtime/"
)

// eventIDEncoding writes event IDs the way xid (which Talos uses) does:
// base32hex, lower case, unpadded. It preserves byte order, so IDs compare
// as strings in the order they were issued.
var eventIDEncoding = base32.NewEncoding("0123456789abcdefghijklmnopqrstuv").WithPadding(base32.NoPadding)

// Events streams the agent's event log as Talos does. The first message is
// an empty "hello" event (no type URL), sent once the stream's start point
// is fixed: Talos' client waits for it before it causes the events it
// expects. Then come the past events the request asks for — the last
// tail_events (-1: every kept event), those after the event tail_id, or
// those of the last tail_seconds; at most one of the three may be set — and
// then every new event until the client goes away. with_actor_id keeps only
// that actor's events.
//
// Publishing never waits for subscribers. A subscriber that falls so far
// behind that events it has not been sent are overwritten in the log is
// ended with ResourceExhausted; one that stops reading altogether holds
// only what gRPC flow control lets through.
func (m *Machine) Events(req *machine.EventsRequest, stream grpc.ServerStreamingServer[machine.Event]) (err error) {
	ctx := stream.Context()

	from, err := m.events.start(req, time.Now())
	if err != nil {
		return err
	}
	if err := stream.Send(&machine.Event{Data: &anypb.Any{}, ActorId: req.GetWithActorId()}); err != nil {
		return err
	}
	last := req.GetTailId() // the ID a client would resume after
	for {
		evs, next, dropped, changed := m.events.Since(from)
		if dropped > 0 {
			resume := "subscribe again to continue"
			if last != "" {
				resume = fmt.Sprintf("subscribe again with tail_id %q to continue after the last event sent", last)
			}
			return status.Errorf(codes.ResourceExhausted,
				"events subscriber too slow: %d events were overwritten in the agent's %d-event log before they could be sent; %s",
				dropped, eventCapacity, resume)
		}
		for _, ev := range evs {
			if actor := req.GetWithActorId(); actor == "" || ev.msg.GetActorId() == actor {
				if err := stream.Send(ev.msg); err != nil {
					return err
				}
			}
			last = ev.msg.GetId()
		}
		from = next
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-m.closed:
			return status.Error(codes.Unavailable, "the example agent is shutting down")
		case <-changed:
		}
	}
}

// publish appends an event caused by actor (empty for the machine itself)
// to the event log, and shows it to the observer.
func (m *Machine) publish(actor string, payload proto.Message) {
	value, err := proto.Marshal(payload)
	if err != nil { // Only invalid UTF-8 in a string field can get here.
		m.log.Warn("event not published", "type", payload.ProtoReflect().Descriptor().FullName(), "error", err)
		return
	}
	m.events.append(actor, &anypb.Any{TypeUrl: eventTypeURL(payload), Value: value})
	if m.observe != nil {
		m.observe(payload)
	}
}

// loggedEvent is one entry of the event log; msg is never changed after it
// is published, so streams may send it concurrently.
type loggedEvent struct {
	at  time.Time // with a monotonic reading: the log is in order of at
	msg *machine.Event
}

// eventLog keeps the latest events, numbered in the order they are
// published.
type eventLog struct {
	*ring.Ring[*loggedEvent]
	lastSec uint32 // seconds field of the latest ID, which never goes back; only touched while the ring appends
}

func newEventLog(capacity int) *eventLog {
	return &eventLog{Ring: ring.New[*loggedEvent](capacity)}
}

// append publishes an event and returns its ID.
//
// An ID is 12 bytes written as 20 characters, as an xid is, so that tools
// which parse Talos event IDs accept it: the Unix time in seconds (4 bytes,
// kept from going back when the clock does) and the event's number
// (8 bytes). IDs therefore sort, as strings, in publication order.
func (l *eventLog) append(actor string, data *anypb.Any) string {
	ev := l.AppendNumbered(func(seq uint64) *loggedEvent {
		now := time.Now()
		l.lastSec = max(l.lastSec, uint32(now.Unix()))
		var raw [12]byte
		binary.BigEndian.PutUint32(raw[:4], l.lastSec)
		binary.BigEndian.PutUint64(raw[4:], seq)
		id := eventIDEncoding.EncodeToString(raw[:])
		return &loggedEvent{at: now, msg: &machine.Event{Data: data, Id: id, ActorId: actor}}
	})
	return ev.msg.GetId()
}

// start validates the tail options of req and returns the number of the
// first event to send. Like Talos, it allows at most one of them.
func (l *eventLog) start(req *machine.EventsRequest, now time.Time) (uint64, error) {
	set := 0
	for _, isSet := range []bool{req.GetTailEvents() != 0, req.GetTailId() != "", req.GetTailSeconds() != 0} {
		if isSet {
			set++
		}
	}
	if set > 1 {
		return 0, status.Error(codes.InvalidArgument, "tail_events, tail_id and tail_seconds are mutually exclusive")
	}
	if req.GetTailSeconds() < 0 {
		return 0, status.Errorf(codes.InvalidArgument, "tail_seconds %d is negative", req.GetTailSeconds())
	}
	if id := req.GetTailId(); id != "" && !validEventID(id) {
		return 0, status.Errorf(codes.InvalidArgument, "tail_id %q is not an event ID (20 characters 0-9, a-v, as in Event.id)", id)
	}

	switch {
	case req.GetTailEvents() != 0:
		return l.TailStart(req.GetTailEvents()), nil
	case req.GetTailId() != "":
		return l.First(func(e *loggedEvent) bool { return e.msg.GetId() > req.GetTailId() }), nil
	case req.GetTailSeconds() > 0:
		cutoff := now.Add(-time.Duration(req.GetTailSeconds()) * time.Second)
		return l.First(func(e *loggedEvent) bool { return e.at.After(cutoff) }), nil
	}
	return l.Next(), nil
}

// validEventID reports whether id has the form of an event ID (ours or an
// xid from Talos).
func validEventID(id string) bool {
	if len(id) != 20 || strings.ToLower(id) != id {
		return false
	}
	_, err := eventIDEncoding.DecodeString(id)
	return err == nil
}

// eventTypeURL returns the type URL the agent gives events carrying m.
func eventTypeURL(m proto.Message) string {
	return eventTypePrefix + string(m.ProtoReflect().Descriptor().FullName())
}
