package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/apid/apid/internal/gateway"
)

// runCheck validates a configuration as serve would read it (file and
// flags) and loads the certificate and inventory files it names, printing
// every problem.
func runCheck(args []string, stdout, stderr io.Writer) error {
	cfg, err := loadConfig("check", args, stderr)
	if err != nil {
		return err
	}
	var problems []string
	if err := cfg.Validate(); err != nil {
		problems = append(problems, strings.Split(err.Error(), "\n")...)
	}
	fileProblems, warnings := gateway.CheckFiles(cfg)
	for _, p := range fileProblems {
		problems = append(problems, p.Error())
	}
	for _, w := range warnings {
		fmt.Fprintf(stderr, "warning: %v\n", w)
	}
	if len(problems) > 0 {
		fmt.Fprintf(stderr, "configuration has %d %s:\n  - %s\n", len(problems), plural(len(problems), "problem"), strings.Join(problems, "\n  - "))
		return errors.New("check failed")
	}
	fmt.Fprintf(stdout, "configuration is valid: listen %s, admin %q, backend %s\n", cfg.Listen, cfg.AdminListen, cfg.Backend)
	return nil
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}
