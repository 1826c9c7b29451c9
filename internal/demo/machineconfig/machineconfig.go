package machineconfig

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/configdiff"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/internal/demo/caller"
)

// Config says what a Store tells others.
type Config struct {
	// Log is the node's log.
	Log *slog.Logger
	// Publish, if set, is told every configuration that becomes active
	// (the resource API's machineconfig).
	Publish func(config.Provider) error
	// Reboot simulates the reboot a configuration applied in reboot mode
	// asks for; without it that mode is refused.
	Reboot func() error
}

// Store is the node's active and staged machine configurations, as Talos
// manages them: ApplyConfiguration validates a document with the machinery
// module's loader and validator, and applies it in the mode asked (the
// simulated machine can apply any change without a reboot, so auto means
// no-reboot; reboot applies it and simulates a reboot; staged keeps it for
// the next simulated reboot, ApplyStaged; try reverts it after its timeout
// unless another apply comes first). Create it with [New].
type Store struct {
	cfg      Config
	apply    sync.Mutex // one ApplyConfiguration at a time, as in Talos
	mu       sync.Mutex
	active   config.Provider // nil until one is applied (maintenance)
	staged   config.Provider
	tryTimer *time.Timer
}

// New returns a store with no configuration: the node is as in maintenance
// mode until one is loaded or applied.
func New(cfg Config) *Store {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Reboot == nil {
		cfg.Reboot = func() error {
			return status.Error(codes.Unimplemented, "this node cannot reboot to apply a configuration")
		}
	}
	return &Store{cfg: cfg}
}

// demoMode is the runtime mode configurations are validated against: a
// machine that needs no install (nothing is installed on a disk).
type demoMode struct{}

func (demoMode) String() string        { return "container" }
func (demoMode) RequiresInstall() bool { return false }
func (demoMode) InContainer() bool     { return true }

// Load makes the configuration document data the active configuration, as
// the node starts with it; empty data leaves the node in maintenance.
func (s *Store) Load(data []byte) error {
	if len(data) == 0 {
		return nil
	}
	cfg, err := configloader.NewFromBytes(data)
	if err != nil {
		return err
	}
	return s.setActive(cfg)
}

// setActive makes cfg the active configuration and publishes it.
func (s *Store) setActive(cfg config.Provider) error {
	s.mu.Lock()
	s.active = cfg
	s.mu.Unlock()
	if s.cfg.Publish == nil {
		return nil
	}
	return s.cfg.Publish(cfg)
}

// ApplyConfiguration applies a machine configuration document, as Talos
// does, to the simulated machine.
func (s *Store) ApplyConfiguration(ctx context.Context, in *machine.ApplyConfigurationRequest) (*machine.ApplyConfigurationResponse, error) {
	if !s.apply.TryLock() {
		return nil, status.Error(codes.FailedPrecondition, "another apply configuration is already in progress")
	}
	defer s.apply.Unlock()

	s.mu.Lock()
	old := s.active
	s.mu.Unlock()
	inMaintenance := old == nil
	if roles := caller.Roles(ctx); !inMaintenance && len(roles) > 0 && !slices.Contains(roles, caller.Admin) {
		return nil, status.Error(codes.PermissionDenied, "not authorized")
	}

	cfg, err := configloader.NewFromBytes(in.GetData())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if !inMaintenance && cfg.RawV1Alpha1() == nil {
		return nil, status.Error(codes.InvalidArgument, "the applied machine configuration doesn't contain v1alpha1 config, did you mean to patch the machine config instead?")
	}
	warnings, err := cfg.Validate(demoMode{})
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}

	mode := in.GetMode()
	modeName := mode.String()
	details := "Applied configuration with a reboot"
	if inMaintenance && mode == machine.ApplyConfigurationRequest_REBOOT {
		mode = machine.ApplyConfigurationRequest_NO_REBOOT
	}
	switch mode {
	case machine.ApplyConfigurationRequest_TRY, machine.ApplyConfigurationRequest_NO_REBOOT:
		details = "Applied configuration without a reboot"
	case machine.ApplyConfigurationRequest_STAGED:
		details = "Staged configuration to be applied after the next reboot"
	case machine.ApplyConfigurationRequest_AUTO:
		// The simulated machine applies any change in place.
		mode = machine.ApplyConfigurationRequest_NO_REBOOT
		details = "Applied configuration without a reboot"
		modeName = fmt.Sprintf("%s(%s)", modeName, mode)
	}

	if in.GetDryRun() {
		var before config.Encoder
		if old != nil {
			before = old
		}
		diff, err := configdiff.DiffConfigs(before, cfg)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "failed to generate diff: %v", err)
		}
		if diff == "" {
			diff = "No changes."
		} else {
			diff = "Config diff:\n\n" + diff
		}
		return applyReply(mode, fmt.Sprintf("Dry run summary:\n%s (skipped in dry-run).\n%s", details, diff), warnings), nil
	}

	s.cfg.Log.Info("apply config request: mode " + strings.ToLower(modeName))
	if mode != machine.ApplyConfigurationRequest_TRY {
		s.cancelTry()
	}
	switch mode {
	case machine.ApplyConfigurationRequest_STAGED:
		s.mu.Lock()
		s.staged = cfg
		s.mu.Unlock()
	case machine.ApplyConfigurationRequest_TRY:
		timeout := constants.ConfigTryTimeout
		if in.GetTryModeTimeout() != nil {
			timeout = in.GetTryModeTimeout().AsDuration()
		}
		if err := s.setActive(cfg); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		s.armTry(old, timeout)
		details += fmt.Sprintf("\nThe config is applied in 'try' mode and will be automatically reverted back in %s", timeout)
	case machine.ApplyConfigurationRequest_REBOOT:
		if err := s.setActive(cfg); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if err := s.cfg.Reboot(); err != nil {
			return nil, err
		}
	default:
		if err := s.setActive(cfg); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	return applyReply(mode, details, warnings), nil
}

func applyReply(mode machine.ApplyConfigurationRequest_Mode, details string, warnings []string) *machine.ApplyConfigurationResponse {
	return &machine.ApplyConfigurationResponse{Messages: []*machine.ApplyConfiguration{{
		Mode: mode, ModeDetails: details, Warnings: warnings,
	}}}
}

// armTry reverts to previous after timeout, unless cancelled first.
func (s *Store) armTry(previous config.Provider, timeout time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tryTimer != nil {
		s.tryTimer.Stop()
	}
	s.tryTimer = time.AfterFunc(timeout, func() {
		s.mu.Lock()
		s.tryTimer = nil
		s.mu.Unlock()
		if previous == nil {
			return
		}
		if err := s.setActive(previous); err != nil {
			s.cfg.Log.Error("configuration not rolled back", "error", err)
			return
		}
		s.cfg.Log.Info("the configuration applied in try mode was rolled back", "after", timeout)
	})
}

// cancelTry keeps a configuration applied in try mode.
func (s *Store) cancelTry() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tryTimer != nil {
		s.tryTimer.Stop()
		s.tryTimer = nil
	}
}

// ApplyStaged makes a staged configuration active: a (simulated) reboot
// calls it as the machine boots again.
func (s *Store) ApplyStaged() {
	s.mu.Lock()
	staged := s.staged
	s.staged = nil
	s.mu.Unlock()
	if staged == nil {
		return
	}
	if err := s.setActive(staged); err != nil {
		s.cfg.Log.Error("staged configuration not applied", "error", err)
		return
	}
	s.cfg.Log.Info("staged configuration applied at boot")
}
