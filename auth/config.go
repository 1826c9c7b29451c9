package auth

// Config is the policy section of apid's configuration: who may call what.
// A reload applies it to calls that start after it.
type Config struct {
	// Replace starts from an empty policy instead of the built-in Talos
	// roles (os:admin may still call everything).
	Replace bool `yaml:"replace" reload:"live"`
	// Rules allow roles to call methods (/pkg.Service/Method or a pattern
	// ending in *); a rule replaces the built-in one for the same method.
	Rules []Rule `yaml:"rules" reload:"live"`
}

// Policy builds the policy the section describes; its error lists every
// bad rule by its key path.
func (c Config) Policy() (*Policy, error) { return NewPolicy(c.Rules, c.Replace) }

// Validate lists every bad rule by its key path.
func (c Config) Validate() error {
	_, err := c.Policy()
	return err
}
