// Package clock serves time.TimeService (Time, TimeCheck) from the local
// clock: the demo node has no NTP client, and says so in every reply.
//
// It must not query a time server, nor set the clock.
package clock
