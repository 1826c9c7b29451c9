package main

import "google.golang.org/grpc/status"

func statusCode(err error) string { return status.Code(err).String() }
