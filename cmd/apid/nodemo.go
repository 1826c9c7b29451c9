//go:build nodemo

package main

import (
	"context"
	"errors"
	"io"
)

// A build with -tags nodemo is the gateway alone: it links neither the
// example agent nor what the demo node serves (the resource runtime).

var errNoDemo = errors.New("this apid was built without the demo and the example agent (-tags nodemo): build it without the tag to run them")

func runDemo(context.Context, []string, io.Writer, io.Writer) error { return errNoDemo }

func runAgent(context.Context, []string, io.Writer) error { return errNoDemo }
