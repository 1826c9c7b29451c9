package certs

import (
	"errors"
	"fmt"
	"time"
)

// Config is the certificates part of apid's configuration; its keys sit at
// the top level of the configuration file. The files' contents are
// re-read while apid runs (every ReloadInterval, and on SIGHUP); their
// paths and the other keys need a restart.
type Config struct {
	Files `yaml:",inline"`
	// AllowTLS12 admits TLS 1.2 clients (with four AEAD suites only).
	AllowTLS12 bool `yaml:"allowTLS12" reload:"restart"`
	// ReloadInterval is how often the files are checked for changes.
	// Default 10s.
	ReloadInterval time.Duration `yaml:"reloadInterval" reload:"restart"`
	// AllowCombinedClientCertificates also accepts client certificates
	// whose extended key usage is serverAuth and clientAuth, as apid node
	// certificates were before the forwarding identity (clientCert) was
	// separate: for a rolling upgrade only. Off: Talos's rule, exactly
	// clientAuth.
	AllowCombinedClientCertificates bool `yaml:"allowCombinedClientCertificates" reload:"restart"`
}

// ServerOptions are the options of the listener's TLS configuration.
func (c Config) ServerOptions() ServerOptions {
	return ServerOptions{AllowTLS12: c.AllowTLS12, AllowCombinedClientCertificates: c.AllowCombinedClientCertificates}
}

// DefaultConfig returns the section with every default; the files have none.
func DefaultConfig() Config {
	return Config{ReloadInterval: DefaultWatchInterval}
}

// Validate lists every bad key, each by its path in the configuration
// file. It reads no file: Check does.
func (c Config) Validate() error {
	var errs []error
	for _, f := range []struct{ key, path string }{{"ca", c.CA}, {"cert", c.Cert}, {"key", c.Key}} {
		if f.path == "" {
			errs = append(errs, fmt.Errorf("%s: a file is required (apid gen makes one)", f.key))
		}
	}
	if (c.ClientCert == "") != (c.ClientKey == "") {
		errs = append(errs, fmt.Errorf("clientCert %q, clientKey %q: set both (the forwarding identity) or neither", c.ClientCert, c.ClientKey))
	}
	if c.ReloadInterval <= 0 {
		errs = append(errs, fmt.Errorf("reloadInterval %s: must be positive", c.ReloadInterval))
	}
	return errors.Join(errs...)
}
