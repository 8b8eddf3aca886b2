// kube-zerocopy-registrar registers the node agent's CSI driver with the kubelet: it serves
// the kubelet's plugin registration on a socket in the kubelet's plugins_registry folder and
// names the agent's CSI socket as the driver's endpoint. It is the node agent's second
// container, the part the Kubernetes node-driver-registrar plays for other drivers.
//
// It is written in Go because the kubelet's plugin watcher dials the registration socket with
// the socket's path as the HTTP/2 :authority, which Rust's HTTP/2 servers (h2) refuse as
// malformed; the kubelet's CSI client, which the agent serves, sends "localhost".
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"google.golang.org/grpc"
	registration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registration.UnimplementedRegistrationServer
	driver   string
	endpoint string
}

// GetInfo tells the kubelet the driver's name and where its CSI services are.
func (r *registrar) GetInfo(context.Context, *registration.InfoRequest) (*registration.PluginInfo, error) {
	return &registration.PluginInfo{
		Type:              registration.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

// NotifyRegistrationStatus is the kubelet's answer. A refusal ends the registrar, so that the
// container restarts and the agent's pod shows why.
func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registration.RegistrationStatus) (*registration.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		slog.Error("the kubelet refused the registration", "driver", r.driver, "error", s.Error)
		os.Exit(1)
	}
	slog.Info("registered with the kubelet", "driver", r.driver, "endpoint", r.endpoint)
	return &registration.RegistrationStatusResponse{}, nil
}

func env(name string) string {
	v := os.Getenv(name)
	if v == "" {
		fmt.Fprintf(os.Stderr, "%s is not set\n", name)
		os.Exit(2)
	}
	return v
}

func main() {
	slog.SetDefault(slog.New(slog.NewJSONHandler(os.Stderr, nil)))
	socket := env("KZC_REGISTRATION_SOCKET")
	r := &registrar{driver: env("KZC_CSI_DRIVER"), endpoint: env("KZC_CSI_ENDPOINT")}
	// A socket left by an earlier run would refuse the listen.
	_ = os.Remove(socket)
	listener, err := net.Listen("unix", socket)
	if err != nil {
		slog.Error("listening", "socket", socket, "error", err)
		os.Exit(1)
	}
	server := grpc.NewServer()
	registration.RegisterRegistrationServer(server, r)
	go func() {
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGTERM, os.Interrupt)
		<-signals
		// The kubelet deregisters a driver whose registration socket is gone.
		server.Stop()
		_ = os.Remove(socket)
		os.Exit(0)
	}()
	slog.Info("serving the registration", "socket", socket, "driver", r.driver, "endpoint", r.endpoint)
	if err := server.Serve(listener); err != nil {
		slog.Error("serving", "error", err)
		os.Exit(1)
	}
}
