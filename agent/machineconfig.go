package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cosi-project/runtime/pkg/state"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/configdiff"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	configres "github.com/siderolabs/talos/pkg/machinery/resources/config"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The node's machine configuration, as Talos manages it: ApplyConfiguration
// validates a document with the machinery module's loader and validator,
// and applies it in the mode asked (the simulated machine can apply any
// change without a reboot, so auto means no-reboot; reboot applies it and
// simulates a reboot; staged keeps it for the next simulated reboot; try
// reverts it after its timeout unless another apply comes first). The
// applied configuration is the resource `machineconfig` (os:admin only,
// as its definition marks it sensitive).

// machineConfigs is the node's active and staged configurations.
type machineConfigs struct {
	apply    sync.Mutex // one ApplyConfiguration at a time, as in Talos
	mu       sync.Mutex
	active   config.Provider // nil until one is applied (maintenance)
	staged   config.Provider
	tryTimer *time.Timer
}

// demoMode is the runtime mode configurations are validated against: a
// machine that needs no install (nothing is installed on a disk).
type demoMode struct{}

func (demoMode) String() string        { return "container" }
func (demoMode) RequiresInstall() bool { return false }
func (demoMode) InContainer() bool     { return true }

// loadInitialConfig makes cfg.MachineConfig the active configuration.
func (s *Server) loadInitialConfig(data []byte) error {
	if len(data) == 0 {
		return nil
	}
	cfg, err := configloader.NewFromBytes(data)
	if err != nil {
		return err
	}
	return s.setActive(cfg)
}

// setActive makes cfg the active configuration and its resource.
func (s *Server) setActive(cfg config.Provider) error {
	s.configs.mu.Lock()
	s.configs.active = cfg
	s.configs.mu.Unlock()
	if s.res == nil {
		return nil
	}
	return s.res.putMachineConfig(cfg)
}

// putMachineConfig creates or replaces the machineconfig resource.
func (r *resources) putMachineConfig(cfg config.Provider) error {
	ctx := context.Background()
	next := configres.NewMachineConfigWithID(cfg, configres.ActiveID)
	cur, err := r.st.Get(ctx, next.Metadata())
	switch {
	case state.IsNotFoundError(err):
		return r.st.Create(ctx, next)
	case err != nil:
		return err
	}
	next.Metadata().SetVersion(cur.Metadata().Version())
	return r.st.Update(ctx, next)
}

// ApplyConfiguration applies a machine configuration document, as Talos
// does, to the simulated machine.
func (s *Server) ApplyConfiguration(ctx context.Context, in *machine.ApplyConfigurationRequest) (*machine.ApplyConfigurationResponse, error) {
	if !s.configs.apply.TryLock() {
		return nil, status.Error(codes.FailedPrecondition, "another apply configuration is already in progress")
	}
	defer s.configs.apply.Unlock()

	s.configs.mu.Lock()
	old := s.configs.active
	s.configs.mu.Unlock()
	inMaintenance := old == nil
	if roles := metadata.ValueFromIncomingContext(ctx, roleKey); !inMaintenance && len(roles) > 0 && !slices.Contains(roles, "os:admin") {
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

	s.log.Info("apply config request: mode " + strings.ToLower(modeName))
	if mode != machine.ApplyConfigurationRequest_TRY {
		s.cancelTry()
	}
	switch mode {
	case machine.ApplyConfigurationRequest_STAGED:
		s.configs.mu.Lock()
		s.configs.staged = cfg
		s.configs.mu.Unlock()
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
		if err := s.beginSequence(seqReboot, newActorID()); err != nil {
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
func (s *Server) armTry(previous config.Provider, timeout time.Duration) {
	s.configs.mu.Lock()
	defer s.configs.mu.Unlock()
	if s.configs.tryTimer != nil {
		s.configs.tryTimer.Stop()
	}
	s.configs.tryTimer = time.AfterFunc(timeout, func() {
		s.configs.mu.Lock()
		s.configs.tryTimer = nil
		s.configs.mu.Unlock()
		if previous == nil {
			return
		}
		if err := s.setActive(previous); err != nil {
			s.log.Error("configuration not rolled back", "error", err)
			return
		}
		s.log.Info("the configuration applied in try mode was rolled back", "after", timeout)
	})
}

// cancelTry keeps a configuration applied in try mode.
func (s *Server) cancelTry() {
	s.configs.mu.Lock()
	defer s.configs.mu.Unlock()
	if s.configs.tryTimer != nil {
		s.configs.tryTimer.Stop()
		s.configs.tryTimer = nil
	}
}

// applyStaged makes a staged configuration active: a (simulated) reboot
// calls it as the machine boots again.
func (s *Server) applyStaged() {
	s.configs.mu.Lock()
	staged := s.configs.staged
	s.configs.staged = nil
	s.configs.mu.Unlock()
	if staged == nil {
		return
	}
	if err := s.setActive(staged); err != nil {
		s.log.Error("staged configuration not applied", "error", err)
		return
	}
	s.log.Info("staged configuration applied at boot")
}
