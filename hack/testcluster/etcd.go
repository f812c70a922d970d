package main

import (
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// runEtcd runs a single-member embedded etcd until SIGTERM/SIGINT.
func runEtcd(args []string) int {
	fs := flag.NewFlagSet("etcd", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "", "etcd data directory (required)")
	clientURL := fs.String("listen-client-url", "http://127.0.0.1:2379", "client URL to listen on (also advertised)")
	peerURL := fs.String("listen-peer-url", "", "peer URL to listen on (default: a free port on 127.0.0.1)")
	maxRequestBytes := fs.Uint("max-request-bytes", 8*1024*1024, "maximum client request size in bytes (etcd default 1.5 MiB is too small for big CRDs)")
	quotaBytes := fs.Int64("quota-backend-bytes", 0, "backend size quota in bytes (0: etcd default, 2 GiB)")
	logLevel := fs.String("log-level", "warn", "etcd log level: debug, info, warn, error")
	fsync := fs.Bool("fsync", false, "fsync writes (default off: UnsafeNoFsync, fine for throwaway test clusters)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *dataDir == "" {
		fmt.Fprintln(os.Stderr, "etcd: --data-dir is required")
		return 2
	}
	curl, err := url.Parse(*clientURL)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: bad --listen-client-url: %v\n", err)
		return 2
	}
	if *peerURL == "" {
		ports, err := freePorts(1)
		if err != nil {
			fmt.Fprintf(os.Stderr, "etcd: %v\n", err)
			return 1
		}
		*peerURL = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	}
	purl, err := url.Parse(*peerURL)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: bad --listen-peer-url: %v\n", err)
		return 2
	}

	cfg := embed.NewConfig()
	cfg.Name = "testcluster"
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = []url.URL{*curl}
	cfg.AdvertiseClientUrls = []url.URL{*curl}
	cfg.ListenPeerUrls = []url.URL{*purl}
	cfg.AdvertisePeerUrls = []url.URL{*purl}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.MaxRequestBytes = *maxRequestBytes
	if *quotaBytes > 0 {
		cfg.QuotaBackendBytes = *quotaBytes
	}
	cfg.UnsafeNoFsync = !*fsync
	cfg.Logger = "zap"
	cfg.LogLevel = *logLevel
	cfg.LogOutputs = []string{"stderr"}

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: start: %v\n", err)
		return 1
	}
	select {
	case <-e.Server.ReadyNotify():
		fmt.Fprintf(os.Stderr, "etcd: ready, serving clients on %s\n", curl)
	case <-time.After(60 * time.Second):
		fmt.Fprintln(os.Stderr, "etcd: not ready after 60s")
		e.Close()
		return 1
	case s := <-sigs:
		fmt.Fprintf(os.Stderr, "etcd: %v before ready, stopping\n", s)
		e.Close()
		return 0
	}
	select {
	case err := <-e.Err():
		fmt.Fprintf(os.Stderr, "etcd: %v\n", err)
		e.Close()
		return 1
	case s := <-sigs:
		fmt.Fprintf(os.Stderr, "etcd: %v, stopping\n", s)
		done := make(chan struct{})
		go func() { e.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			fmt.Fprintln(os.Stderr, "etcd: close timed out")
			return 1
		}
		return 0
	}
}
