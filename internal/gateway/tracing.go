package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
)

// TracingConfig turns on OpenTelemetry traces exported over OTLP/gRPC.
type TracingConfig struct {
	// Endpoint is the OTLP/gRPC collector, host:port. Empty: the standard
	// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT
	// variable; with neither, tracing is off and costs nothing.
	Endpoint string `yaml:"endpoint"`
	// Insecure sends spans without TLS (a collector on loopback or a
	// private network). OTEL_EXPORTER_OTLP_INSECURE says the same.
	Insecure bool `yaml:"insecure"`
	// SampleRatio is the share of traces apid starts that it keeps (a
	// caller's sampling decision in its traceparent is always followed).
	// Default 1.
	SampleRatio float64 `yaml:"sampleRatio"`
}

// Validate lists every bad key, each by its path in the configuration file.
func (t TracingConfig) Validate() error {
	var errs []error
	if t.SampleRatio < 0 || t.SampleRatio > 1 {
		errs = append(errs, fmt.Errorf("tracing.sampleRatio %g: want 0 to 1", t.SampleRatio))
	}
	if t.Endpoint != "" {
		if _, _, err := net.SplitHostPort(t.Endpoint); err != nil {
			errs = append(errs, fmt.Errorf("tracing.endpoint %q: want host:port", t.Endpoint))
		}
	}
	return errors.Join(errs...)
}

// enabled reports whether traces are exported.
func (t TracingConfig) enabled() bool {
	return t.Endpoint != "" || os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != ""
}

// tracing is apid's tracer provider and what hooks it into gRPC: a server
// span per call, a client span per call to a node or the local agent, with
// W3C trace context propagated to them.
type tracing struct {
	provider *sdktrace.TracerProvider
	tracer   trace.Tracer
	prop     propagation.TextMapPropagator
}

// newTracing returns nil when tracing is off.
func newTracing(cfg TracingConfig, instance string) (*tracing, error) {
	if !cfg.enabled() {
		return nil, nil
	}
	var opts []otlptracegrpc.Option
	if cfg.Endpoint != "" {
		opts = append(opts, otlptracegrpc.WithEndpoint(cfg.Endpoint))
	}
	if cfg.Insecure {
		opts = append(opts, otlptracegrpc.WithInsecure())
	}
	exporter, err := otlptracegrpc.New(context.Background(), opts...)
	if err != nil {
		return nil, fmt.Errorf("tracing: %w", err)
	}
	// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override these.
	res, err := resource.New(context.Background(),
		resource.WithAttributes(attribute.String("service.name", "apid"), attribute.String("service.instance.id", instance)),
		resource.WithTelemetrySDK(), resource.WithFromEnv())
	if err != nil {
		return nil, fmt.Errorf("tracing resource: %w", err)
	}
	provider := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exporter),
		sdktrace.WithResource(res),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(cfg.SampleRatio))),
	)
	return &tracing{provider: provider, tracer: provider.Tracer("github.com/apid/apid"), prop: propagation.TraceContext{}}, nil
}

func (t *tracing) serverOption() grpc.ServerOption {
	return grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithTracerProvider(t.provider), otelgrpc.WithPropagators(t.prop)))
}

func (t *tracing) dialOption() grpc.DialOption {
	return grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(t.provider), otelgrpc.WithPropagators(t.prop)))
}

// shutdown sends the spans still buffered.
func (t *tracing) shutdown(ctx context.Context) error { return t.provider.Shutdown(ctx) }
