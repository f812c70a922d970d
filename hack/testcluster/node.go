//go:build linux

package main

// The node tier: one real node beside the control plane 'up' runs, so that pods run.
//
// containerd (Debian's) with runc and the CNI bridge, the kubelet, kube-scheduler and kube-proxy
// (upstream, from this binary) and CoreDNS (a host process on the bridge's gateway, where the
// pods' resolv.conf points). Images come only from OCI archives imported into containerd. On
// SIGTERM it removes every pod sandbox through containerd's CRI API, stops what it started and
// undoes what it changed on the host (mounts, iptables rules, the bridge, the pods' cgroups), so
// the machine is left as it was found; 'node-clean' does the same after a 'node' that was killed.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// nodeTierPackages are the Debian packages the node tier runs (apt-get install ...).
const nodeTierPackages = "containerd runc containernetworking-plugins iptables iproute2"

// exitNodeUnavailable is the exit status when this machine cannot run a node (not root, a
// package missing): tests skip on it, and fail on it under CI.
const exitNodeUnavailable = 3

// nodePaths are where one node keeps its state; every path derives from DIR and the run dir.
type nodePaths struct {
	dir            string // configs, logs, the kubelet's root
	run            string // containerd's socket and state (short: a unix socket path is ≤ 107 bytes)
	containerdRoot string // images and snapshots (may live in a cache, to keep imports)
	bridge         string
}

func (p nodePaths) socket() string          { return filepath.Join(p.run, "containerd.sock") }
func (p nodePaths) containerdState() string { return filepath.Join(p.run, "state") }
func (p nodePaths) kubeletRoot() string     { return filepath.Join(p.dir, "kubelet") }
func (p nodePaths) cniConfDir() string      { return filepath.Join(p.dir, "cni", "net.d") }
func (p nodePaths) cniIPAMDir() string      { return filepath.Join(p.dir, "cni", "ipam") }
func (p nodePaths) containerdConfig() string {
	return filepath.Join(p.dir, "containerd.toml")
}
func (p nodePaths) proxyConfig() string { return filepath.Join(p.dir, "kube-proxy.yaml") }

func nodeFlags(fs *flag.FlagSet) (*nodePaths, *string) {
	p := &nodePaths{}
	fs.StringVar(&p.dir, "dir", "", "working folder: configs, logs, the kubelet's root (required; created if missing)")
	fs.StringVar(&p.run, "run-dir", "/run/distill-node", "containerd's socket and state")
	fs.StringVar(&p.containerdRoot, "containerd-root", "", "containerd's images and snapshots (default DIR/containerd); "+
		"a folder kept between runs keeps the imported images")
	fs.StringVar(&p.bridge, "bridge", "distill0", "the pods' bridge (created, and deleted on exit)")
	gateway := fs.String("node-ip", "10.88.0.1", "the bridge's address: pods' gateway, DNS server and the API server's endpoint "+
		"(give 'up' the same --node-ip)")
	return p, gateway
}

func (p *nodePaths) resolve() error {
	if p.dir == "" {
		return errors.New("--dir is required")
	}
	dir, err := filepath.Abs(p.dir)
	if err != nil {
		return err
	}
	p.dir = dir
	if p.containerdRoot == "" {
		p.containerdRoot = filepath.Join(p.dir, "containerd")
	}
	if len(p.socket()) > 100 {
		return fmt.Errorf("--run-dir %s is too long for a unix socket path", p.run)
	}
	return nil
}

func runNode(args []string) int {
	fs := flag.NewFlagSet("node", flag.ContinueOnError)
	paths, nodeIP := nodeFlags(fs)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig of the control plane ('up' writes DIR/kubeconfig) (required)")
	podCIDR := fs.String("pod-cidr", "10.88.0.0/16", "the pods' addresses (the bridge's subnet)")
	coredns := fs.String("coredns", "", "CoreDNS binary (hack/build-tools.sh builds it) (required)")
	sandboxImage := fs.String("sandbox-image", "localhost/distill-node/pause:1", "the pod sandbox image; one of the --image archives must name it")
	exitWithParent := fs.Bool("exit-with-parent", true, "tear the node down when the process that started it exits")
	timeout := fs.Duration("timeout", 5*time.Minute, "how long to wait for the node to be Ready (image imports included)")
	var images stringList
	fs.Var(&images, "image", "OCI image archive to import into containerd (repeatable; skipped when already there)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	logf := func(format string, a ...any) { fmt.Fprintf(os.Stderr, "testcluster node: "+format+"\n", a...) }
	if err := paths.resolve(); err != nil || *kubeconfig == "" || *coredns == "" || fs.NArg() != 0 {
		if err != nil {
			logf("%v", err)
		}
		fmt.Fprintln(os.Stderr, "usage: testcluster node --dir DIR --kubeconfig K --coredns BIN [--image ARCHIVE]... [flags]")
		return 2
	}
	if missing := nodePreflight(*coredns); missing != "" {
		logf("this machine cannot run the node tier: %s", missing)
		return exitNodeUnavailable
	}
	_, cidr, err := net.ParseCIDR(*podCIDR)
	if err != nil || !cidr.Contains(net.ParseIP(*nodeIP)) {
		logf("--node-ip %s must be an address inside --pod-cidr %s", *nodeIP, *podCIDR)
		return 2
	}
	self := "/proc/self/exe"
	if err := os.MkdirAll(paths.dir, 0o755); err != nil {
		logf("%v", err)
		return 1
	}
	// Whatever a killed run left goes first: its sandboxes, mounts, rules and bridge.
	cleanNode(*paths, self, logf)
	for _, d := range []string{paths.run, paths.containerdRoot, paths.cniConfDir(), paths.kubeletRoot()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			logf("%v", err)
			return 1
		}
	}

	ctx, cancel := signalContext(*exitWithParent)
	defer cancel()
	sup := newSupervisor(paths.dir, logf)
	t0 := time.Now()
	node := &nodeRun{paths: *paths, self: self, sup: sup, logf: logf}
	defer node.teardown()
	if err := node.bringUp(ctx, *kubeconfig, *nodeIP, *podCIDR, *coredns, *sandboxImage, images, *timeout); err != nil {
		if ctx.Err() != nil {
			logf("stopping before the node was ready")
			return 0
		}
		logf("%v", err)
		return 1
	}
	logf("node %s ready after %.1fs", node.name, time.Since(t0).Seconds())
	fmt.Printf("NODE READY name=%s ip=%s\n", node.name, *nodeIP)
	os.Stdout.Sync()
	select {
	case c := <-sup.exited:
		logf("%s exited unexpectedly (%v); last lines of %s:\n%s", c.name, c.err, c.log, tailFile(c.log, 30))
		return 1
	case <-ctx.Done():
		logf("stopping")
		return 0
	}
}

func runNodeClean(args []string) int {
	fs := flag.NewFlagSet("node-clean", flag.ContinueOnError)
	paths, _ := nodeFlags(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	logf := func(format string, a ...any) { fmt.Fprintf(os.Stderr, "testcluster node-clean: "+format+"\n", a...) }
	if err := paths.resolve(); err != nil {
		logf("%v", err)
		return 2
	}
	if os.Geteuid() != 0 {
		logf("needs root")
		return exitNodeUnavailable
	}
	cleanNode(*paths, "/proc/self/exe", logf)
	return 0
}

// nodePreflight names what this machine lacks to run a node, or returns "".
func nodePreflight(coredns string) string {
	if os.Geteuid() != 0 {
		return "it needs root (containerd, mounts, iptables, a bridge)"
	}
	var missing []string
	for _, program := range []string{"containerd", "ctr", "runc", "iptables", "ip"} {
		if _, err := exec.LookPath(program); err != nil {
			missing = append(missing, program)
		}
	}
	for _, plugin := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, plugin)); err != nil {
			missing = append(missing, cniBinDir+"/"+plugin)
		}
	}
	if len(missing) > 0 {
		return fmt.Sprintf("%s not found: apt-get install %s", strings.Join(missing, ", "), nodeTierPackages)
	}
	if _, err := os.Stat(coredns); err != nil {
		return fmt.Sprintf("CoreDNS %s not found: run hack/build-tools.sh", coredns)
	}
	return ""
}

// cniBinDir is where Debian's containernetworking-plugins puts the plugins.
const cniBinDir = "/usr/lib/cni"

func signalContext(exitWithParent bool) (context.Context, context.CancelFunc) {
	// A parent that dies closes our stdout and stderr: the teardown's messages must then fail
	// to write (EPIPE), not kill this process half-way through the teardown (SIGPIPE).
	signal.Ignore(syscall.SIGPIPE)
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	ppid := os.Getppid()
	go func() {
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sigs:
				cancel()
				return
			case <-t.C:
				if exitWithParent && os.Getppid() != ppid {
					cancel()
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return ctx, cancel
}

type nodeRun struct {
	paths nodePaths
	self  string
	sup   *supervisor
	logf  func(format string, a ...any)
	name  string
	once  sync.Once
}

func (n *nodeRun) bringUp(ctx context.Context, kubeconfig, nodeIP, podCIDR, coredns, sandboxImage string, images []string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	hostname, err := os.Hostname()
	if err != nil {
		return err
	}
	// The API server reaches kubelets by node name: it must be the machine's hostname.
	n.name = strings.ToLower(hostname)
	if err := setUpHostNetwork(n.paths.bridge, nodeIP, podCIDR); err != nil {
		return fmt.Errorf("host network: %w", err)
	}
	ports, err := freePorts(5)
	if err != nil {
		return err
	}
	kubeletPort, kubeletHealthz, schedulerPort, proxyHealthz, proxyMetrics := ports[0], ports[1], ports[2], ports[3], ports[4]
	if err := n.writeConfigs(kubeconfig, nodeIP, podCIDR, sandboxImage, kubeletPort, kubeletHealthz, proxyHealthz, proxyMetrics); err != nil {
		return err
	}

	if _, err := n.sup.start("containerd", "containerd", "containerd", []string{"--config", n.paths.containerdConfig()}); err != nil {
		return err
	}
	if err := waitFor(ctx, deadline, "containerd's CRI API", func() error { return criVersion(n.paths.socket()) }); err != nil {
		return n.withLog(err, "containerd")
	}
	if err := importImages(ctx, n.paths.socket(), images, n.logf); err != nil {
		return err
	}
	if err := requireImage(n.paths.socket(), sandboxImage); err != nil {
		return err
	}

	corefile := filepath.Join(n.paths.dir, "Corefile")
	if err := os.WriteFile(corefile, []byte(corefileText(nodeIP, kubeconfig)), 0o644); err != nil {
		return err
	}
	if _, err := n.sup.start("coredns", coredns, "coredns", []string{"-conf", corefile}); err != nil {
		return err
	}
	if _, err := n.sup.startSelf(n.self, "kube-scheduler",
		"--kubeconfig="+kubeconfig, "--authentication-kubeconfig="+kubeconfig, "--authorization-kubeconfig="+kubeconfig,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(schedulerPort)); err != nil {
		return err
	}
	if _, err := n.sup.startSelf(n.self, "kube-proxy", "--config="+n.paths.proxyConfig()); err != nil {
		return err
	}
	if _, err := n.sup.startSelf(n.self, "kubelet",
		"--config="+filepath.Join(n.paths.dir, "kubelet.yaml"),
		"--kubeconfig="+kubeconfig,
		"--root-dir="+n.paths.kubeletRoot(),
		"--hostname-override="+n.name,
		"--node-ip="+nodeIP); err != nil {
		return err
	}

	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, deadline, "node "+n.name+" Ready", func() error { return untaintWhenReady(ctx, client, n.name) }); err != nil {
		return n.withLog(err, "kubelet")
	}
	resolveOnce := func() error { return resolveVia(ctx, nodeIP, "kubernetes.default.svc.cluster.local") }
	if err := waitFor(ctx, deadline, "CoreDNS answering on "+nodeIP, resolveOnce); err != nil {
		return n.withLog(err, "coredns")
	}
	return nil
}

func (n *nodeRun) withLog(err error, component string) error {
	if c := n.sup.byName(component); c != nil {
		return fmt.Errorf("%w; last lines of %s:\n%s", err, c.log, tailFile(c.log, 20))
	}
	return err
}

// teardown stops the node in the order that leaves nothing behind: the kubelet (so it starts
// no pod again), every sandbox through the CRI (network namespaces, CNI addresses and rules go
// with them), the other components, containerd, then what is left on the host.
func (n *nodeRun) teardown() {
	n.once.Do(func() {
		t0 := time.Now()
		n.sup.byName("kubelet").stop(20 * time.Second)
		if c := n.sup.byName("containerd"); c != nil && !c.exited() {
			removeAllSandboxes(n.paths.socket(), n.logf)
		}
		var wg sync.WaitGroup
		for _, name := range []string{"kube-proxy", "kube-scheduler", "coredns", "containerd"} {
			if c := n.sup.byName(name); c != nil {
				wg.Add(1)
				go func() { defer wg.Done(); c.stop(15 * time.Second) }()
			}
		}
		wg.Wait()
		cleanHost(n.paths, n.self, n.logf)
		n.logf("node torn down in %.1fs", time.Since(t0).Seconds())
	})
}

// cleanNode undoes what a node run left (after a kill): it starts containerd once more if its
// state is there, to remove the sandboxes through the CRI, then cleans the host.
func cleanNode(p nodePaths, self string, logf func(string, ...any)) {
	if _, err := os.Stat(p.containerdConfig()); err == nil && criVersion(p.socket()) != nil {
		if hasSandboxState(p) {
			sup := newSupervisor(p.dir, logf)
			c, err := sup.start("containerd-clean", "containerd", "containerd", []string{"--config", p.containerdConfig()})
			if err == nil {
				deadline := time.Now().Add(30 * time.Second)
				if waitFor(context.Background(), deadline, "containerd", func() error { return criVersion(p.socket()) }) == nil {
					removeAllSandboxes(p.socket(), logf)
				}
				c.stop(15 * time.Second)
			}
		}
	} else if err == nil {
		removeAllSandboxes(p.socket(), logf) // a containerd of a killed run still answers
	}
	cleanHost(p, self, logf)
}

func hasSandboxState(p nodePaths) bool {
	entries, err := os.ReadDir(filepath.Join(p.containerdRoot, "io.containerd.grpc.v1.cri", "sandboxes"))
	return err == nil && len(entries) > 0
}

// cleanHost removes what survives the processes: shims and pod processes of this node,
// mounts under its folders, kube-proxy's rules, the bridge, the pods' cgroups, the run dir.
func cleanHost(p nodePaths, self string, logf func(string, ...any)) {
	killProcessesMentioning(p.socket(), logf) // containerd-shim-runc-v2 ... -address SOCKET
	killPodCgroupProcesses(logf)
	unmountUnder(logf, p.kubeletRoot(), p.run, p.containerdRoot)
	if out, err := exec.Command(self, "kube-proxy", "--cleanup", "--config="+p.proxyConfig()).CombinedOutput(); err != nil {
		if _, statErr := os.Stat(p.proxyConfig()); statErr == nil {
			logf("kube-proxy --cleanup: %v: %s", err, lastLines(string(out), 5))
		}
	}
	removeKubeChains(logf) // the kubelet's own (KUBE-FIREWALL, the canaries), and any kube-proxy left
	if linkExists(p.bridge) {
		if out, err := exec.Command("ip", "link", "delete", p.bridge).CombinedOutput(); err != nil {
			logf("delete bridge %s: %v: %s", p.bridge, err, out)
		}
	}
	removePodCgroups(logf)
	_ = os.RemoveAll(p.cniIPAMDir())
	_ = os.RemoveAll(p.run)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func waitFor(ctx context.Context, deadline time.Time, what string, check func() error) error {
	for {
		err := check()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not after the deadline (last error: %v)", what, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// ---------------------------------------------------------------------------------------------
// Host network: forwarding, the bridge, and DNS
// ---------------------------------------------------------------------------------------------

func setUpHostNetwork(bridge, nodeIP, podCIDR string) error {
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	// Bridged replies to a Service's pod pass through iptables only with br_netfilter; where it
	// cannot load, kube-proxy's masqueradeAll sends them back through the host instead.
	_ = exec.Command("modprobe", "br_netfilter").Run()
	_ = os.WriteFile("/proc/sys/net/bridge/bridge-nf-call-iptables", []byte("1"), 0o644)
	ones, _ := netMaskOnes(podCIDR)
	for _, args := range [][]string{
		{"link", "add", bridge, "type", "bridge"},
		{"addr", "add", fmt.Sprintf("%s/%d", nodeIP, ones), "dev", bridge},
		{"link", "set", bridge, "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

func netMaskOnes(cidr string) (int, error) {
	_, n, err := net.ParseCIDR(cidr)
	if err != nil {
		return 0, err
	}
	ones, _ := n.Mask.Size()
	return ones, nil
}

func linkExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

func corefileText(nodeIP, kubeconfig string) string {
	return fmt.Sprintf(`.:53 {
    bind %s
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig %s testcluster
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    forward . /etc/resolv.conf
    cache 30
}
`, nodeIP, kubeconfig)
}

func resolveVia(ctx context.Context, server, name string) error {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{Timeout: 2 * time.Second}).DialContext(ctx, network, net.JoinHostPort(server, "53"))
	}}
	lookup, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	addrs, err := r.LookupHost(lookup, name)
	if err != nil {
		return err
	}
	if len(addrs) == 0 {
		return fmt.Errorf("%s: no address", name)
	}
	return nil
}

// ---------------------------------------------------------------------------------------------
// Configuration files
// ---------------------------------------------------------------------------------------------

func (n *nodeRun) writeConfigs(kubeconfig, nodeIP, podCIDR, sandboxImage string, kubeletPort, kubeletHealthz, proxyHealthz, proxyMetrics int) error {
	p := n.paths
	cni := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "distill-node",
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": p.bridge, "isGateway": true, "ipMasq": true, "hairpinMode": true,
				"ipam": map[string]any{
					"type": "host-local", "dataDir": p.cniIPAMDir(),
					"ranges": []any{[]any{map[string]any{"subnet": podCIDR, "gateway": nodeIP}}},
					"routes": []any{map[string]any{"dst": "0.0.0.0/0"}},
				},
			},
		},
	}
	cniJSON, err := json.MarshalIndent(cni, "", "  ")
	if err != nil {
		return err
	}
	files := map[string]string{
		filepath.Join(p.cniConfDir(), "10-distill-node.conflist"): string(cniJSON),
		p.containerdConfig(): fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  # root cannot lower oom_score_adj on this kind of machine: without this every sandbox fails
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
    max_conf_num = 1
`, p.containerdRoot, p.containerdState(), p.socket(), sandboxImage, cniBinDir, p.cniConfDir()),
		filepath.Join(p.dir, "kubelet.yaml"): fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://%s
cgroupDriver: cgroupfs
# CPU limits are not enforced (no CFS quota): requests still decide where pods fit, but on a
# 2-core node a Ray head throttled to its share of a core does not start within Ray's timeout
cpuCFSQuota: false
failCgroupV1: false
failSwapOn: false
clusterDNS: [%s]
clusterDomain: cluster.local
makeIPTablesUtilChains: false
serializeImagePulls: false
# images come only from imported archives: never collect them, never evict for disk
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "200Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
rotateCertificates: false
serverTLSBootstrap: false
registerNode: true
`, kubeletPort, kubeletHealthz, p.socket(), nodeIP),
		p.proxyConfig(): fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %s}
mode: iptables
clusterCIDR: %s
hostnameOverride: %s
iptables: {masqueradeAll: true}
conntrack: {maxPerCore: 0}
healthzBindAddress: 127.0.0.1:%d
metricsBindAddress: 127.0.0.1:%d
`, kubeconfig, podCIDR, n.name, proxyHealthz, proxyMetrics),
	}
	for path, text := range files {
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// ---------------------------------------------------------------------------------------------
// containerd: CRI calls and image imports
// ---------------------------------------------------------------------------------------------

func criClient(socket string) (runtimeapi.RuntimeServiceClient, func(), error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	return runtimeapi.NewRuntimeServiceClient(conn), func() { conn.Close() }, nil
}

func criVersion(socket string) error {
	if _, err := os.Stat(socket); err != nil {
		return err
	}
	rt, closeConn, err := criClient(socket)
	if err != nil {
		return err
	}
	defer closeConn()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err = rt.Version(ctx, &runtimeapi.VersionRequest{})
	return err
}

// removeAllSandboxes is `crictl rmp -fa`: stopping a sandbox tears down its network (CNI DEL)
// and its containers; removing it frees its snapshots.
func removeAllSandboxes(socket string, logf func(string, ...any)) {
	rt, closeConn, err := criClient(socket)
	if err != nil {
		return
	}
	defer closeConn()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	list, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		logf("list pod sandboxes: %v", err)
		return
	}
	for _, s := range list.Items {
		if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: s.Id}); err != nil {
			logf("stop sandbox %s/%s: %v", s.Metadata.GetNamespace(), s.Metadata.GetName(), err)
		}
		if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: s.Id}); err != nil {
			logf("remove sandbox %s/%s: %v", s.Metadata.GetNamespace(), s.Metadata.GetName(), err)
		}
	}
	if len(list.Items) > 0 {
		logf("removed %d pod sandboxes", len(list.Items))
	}
}

func ctr(socket string, args ...string) ([]byte, error) {
	full := append([]string{"--address", socket, "--namespace", "k8s.io"}, args...)
	out, err := exec.Command("ctr", full...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ctr %s: %v: %s", strings.Join(args, " "), err, lastLines(string(out), 10))
	}
	return out, nil
}

// imageDigests maps each image name in containerd to its manifest digest.
func imageDigests(socket string) (map[string]string, error) {
	out, err := ctr(socket, "images", "ls")
	if err != nil {
		return nil, err
	}
	digests := map[string]string{}
	for _, line := range strings.Split(string(out), "\n")[1:] {
		fields := strings.Fields(line)
		if len(fields) >= 3 {
			digests[fields[0]] = fields[2]
		}
	}
	return digests, nil
}

// importImages imports each archive unless containerd already holds its image at the same digest;
// an older image under the same name is replaced.
func importImages(ctx context.Context, socket string, archives []string, logf func(string, ...any)) error {
	have, err := imageDigests(socket)
	if err != nil {
		return err
	}
	for _, archive := range archives {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		ref, digest, err := archiveImage(archive)
		if err != nil {
			return err
		}
		if have[ref] == digest {
			logf("image %s already imported", ref)
			continue
		}
		t0 := time.Now()
		// --base-name keeps a full reference (registry/repo:tag) as the image's name.
		if _, err := ctr(socket, "images", "import", "--base-name", repository(ref), archive); err != nil {
			return fmt.Errorf("import %s: %w", archive, err)
		}
		logf("imported %s from %s in %.1fs", ref, filepath.Base(archive), time.Since(t0).Seconds())
	}
	return nil
}

func requireImage(socket, ref string) error {
	have, err := imageDigests(socket)
	if err != nil {
		return err
	}
	if _, ok := have[ref]; !ok {
		names := make([]string, 0, len(have))
		for name := range have {
			names = append(names, name)
		}
		sort.Strings(names)
		return fmt.Errorf("containerd has no image %s (the sandbox image): pass its archive with --image; it has %v", ref, names)
	}
	return nil
}

// repository is a reference without its tag (a registry's port is not a tag).
func repository(ref string) string {
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		return ref[:i]
	}
	return ref
}

// ---------------------------------------------------------------------------------------------
// The Node object
// ---------------------------------------------------------------------------------------------

// untaintWhenReady waits for the node's Ready condition, then removes the not-ready taint the
// kubelet registers with (no node-lifecycle controller runs here to remove it).
func untaintWhenReady(ctx context.Context, client kubernetes.Interface, name string) error {
	node, err := client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	ready := false
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
			ready = true
		}
	}
	if !ready {
		return fmt.Errorf("node %s is not Ready yet", name)
	}
	kept := node.Spec.Taints[:0]
	for _, t := range node.Spec.Taints {
		if t.Key != corev1.TaintNodeNotReady && t.Key != corev1.TaintNodeUnreachable {
			kept = append(kept, t)
		}
	}
	if len(kept) == len(node.Spec.Taints) {
		return nil
	}
	node.Spec.Taints = kept
	_, err = client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{})
	return err
}

// ---------------------------------------------------------------------------------------------
// Host cleanup
// ---------------------------------------------------------------------------------------------

func killProcessesMentioning(needle string, logf func(string, ...any)) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(cmdline), needle) {
			continue
		}
		logf("killing leftover process %d: %s", pid, strings.ReplaceAll(string(cmdline), "\x00", " "))
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// removeKubeChains deletes every KUBE-* chain in every table, for IPv4 and IPv6, and the rules
// of the built-in chains that jump to them.
func removeKubeChains(logf func(string, ...any)) {
	removed := 0
	for _, program := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(program); err != nil {
			continue
		}
		for _, table := range []string{"filter", "nat", "mangle", "raw"} {
			out, err := exec.Command(program, "-w", "-t", table, "-S").Output()
			if err != nil {
				continue
			}
			var chains []string
			for _, line := range strings.Split(string(out), "\n") {
				fields := splitRule(line)
				switch {
				case len(fields) == 2 && fields[0] == "-N" && strings.HasPrefix(fields[1], "KUBE-"):
					chains = append(chains, fields[1])
				case len(fields) > 2 && fields[0] == "-A" && !strings.HasPrefix(fields[1], "KUBE-") && strings.Contains(line, " -j KUBE-"):
					fields[0] = "-D"
					if out, err := exec.Command(program, append([]string{"-w", "-t", table}, fields...)...).CombinedOutput(); err != nil {
						logf("%s -t %s %s: %v: %s", program, table, strings.Join(fields, " "), err, out)
					}
				}
			}
			for _, verb := range []string{"-F", "-X"} {
				for _, chain := range chains {
					_ = exec.Command(program, "-w", "-t", table, verb, chain).Run()
				}
			}
			removed += len(chains)
		}
	}
	if removed > 0 {
		logf("removed %d KUBE-* iptables chains", removed)
	}
}

// splitRule splits a line of `iptables -S` into its arguments: fields separated by spaces,
// a double-quoted one (a comment) kept whole without its quotes.
func splitRule(line string) []string {
	var fields []string
	var current strings.Builder
	inQuotes, started := false, false
	for _, r := range line {
		switch {
		case r == '"':
			inQuotes, started = !inQuotes, true
		case r == ' ' && !inQuotes:
			if started {
				fields = append(fields, current.String())
				current.Reset()
				started = false
			}
		default:
			current.WriteRune(r)
			started = true
		}
	}
	if started {
		fields = append(fields, current.String())
	}
	return fields
}

// podCgroupDirs are the kubelet's pod cgroups in every v1 hierarchy (and the v2 one).
func podCgroupDirs() []string {
	matches, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods*")
	more, _ := filepath.Glob("/sys/fs/cgroup/kubepods*")
	return append(matches, more...)
}

func killPodCgroupProcesses(logf func(string, ...any)) {
	for _, top := range podCgroupDirs() {
		_ = filepath.WalkDir(top, func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
				return nil
			}
			data, _ := os.ReadFile(path)
			for _, field := range strings.Fields(string(data)) {
				if pid, err := strconv.Atoi(field); err == nil {
					logf("killing leftover pod process %d", pid)
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			return nil
		})
	}
}

func removePodCgroups(logf func(string, ...any)) {
	for _, top := range podCgroupDirs() {
		var dirs []string
		_ = filepath.WalkDir(top, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- { // deepest first
			for attempt := 0; attempt < 20; attempt++ {
				if err := syscall.Rmdir(dirs[i]); err == nil || errors.Is(err, syscall.ENOENT) {
					break
				} else if attempt == 19 {
					logf("cgroup %s stays: %v", dirs[i], err)
				}
				time.Sleep(100 * time.Millisecond) // killed processes take a moment to leave
			}
		}
	}
}

// unmountUnder detaches every mount at or below the given folders, deepest first.
func unmountUnder(logf func(string, ...any), roots ...string) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var targets []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		mountPoint := unescapeMountPath(fields[4])
		for _, root := range roots {
			if mountPoint == root || strings.HasPrefix(mountPoint, root+"/") {
				targets = append(targets, mountPoint)
			}
		}
	}
	sort.Slice(targets, func(i, j int) bool { return len(targets[i]) > len(targets[j]) })
	for _, t := range targets {
		if err := syscall.Unmount(t, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) {
			logf("unmount %s: %v", t, err)
		}
	}
	if len(targets) > 0 {
		logf("unmounted %d leftover mounts", len(targets))
	}
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space, ...).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
