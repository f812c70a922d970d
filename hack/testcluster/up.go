package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

const parentPIDEnv = "TESTCLUSTER_PARENT_PID"

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, " ") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// child is one control-plane component running as a child process.
type child struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // exit status, valid after done is closed
}

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, waits up to grace, then sends SIGKILL and waits.
func (c *child) stop(grace time.Duration) {
	if c == nil || c.exited() {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		return
	case <-time.After(grace):
	}
	fmt.Fprintf(os.Stderr, "testcluster: %s did not exit %s after SIGTERM, killing\n", c.name, grace)
	_ = c.cmd.Process.Kill()
	<-c.done
}

// freePorts returns n distinct free TCP ports on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pick a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// startParentWatchdog is a backstop for children of "up": if "up" goes away
// (the process is re-parented) and the component has not exited within a
// grace period after the Pdeathsig SIGTERM, exit hard.
func startParentWatchdog() {
	v := os.Getenv(parentPIDEnv)
	if v == "" {
		return
	}
	os.Unsetenv(parentPIDEnv)
	ppid, err := strconv.Atoi(v)
	if err != nil {
		return
	}
	go func() {
		for os.Getppid() == ppid {
			time.Sleep(500 * time.Millisecond)
		}
		time.Sleep(15 * time.Second)
		fmt.Fprintln(os.Stderr, "testcluster: parent process is gone, exiting")
		os.Exit(1)
	}()
}

func tailFile(path string, lines int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	var buf []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		buf = append(buf, sc.Text())
		if len(buf) > lines {
			buf = buf[1:]
		}
	}
	return strings.Join(buf, "\n")
}

// nodeControllers are what pods on a node need from kube-controller-manager: ServiceAccounts
// and the root CA ConfigMap (every pod mounts both), Deployments down to Pods, Jobs (KubeRay's
// submitter), Services' endpoints, PersistentVolume binding, and the garbage collector.
var nodeControllers = []string{
	"garbage-collector-controller", "namespace-controller",
	"serviceaccount-controller", "root-ca-certificate-publisher-controller",
	"deployment-controller", "replicaset-controller", "job-controller",
	"endpoints-controller", "endpointslice-controller", "endpointslice-mirroring-controller",
	"persistentvolume-binder-controller", "pod-garbage-collector-controller",
	"ttl-after-finished-controller",
}

func flagGiven(fs *flag.FlagSet, name string) bool {
	given := false
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == name })
	return given
}

func runUp(args []string) int {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	dirFlag := fs.String("dir", "", "working directory for certificates, kubeconfig, etcd data and logs (required; created if missing)")
	securePort := fs.Int("secure-port", 0, "kube-apiserver port on 127.0.0.1 (0: pick a free port)")
	controllers := fs.String("controllers", "garbage-collector-controller,namespace-controller", "kube-controller-manager --controllers value")
	noKCM := fs.Bool("no-controller-manager", false, "do not start kube-controller-manager")
	keepData := fs.Bool("keep-data", false, "reuse etcd data left in DIR by a previous run (default: start empty)")
	exitWithParent := fs.Bool("exit-with-parent", true, "stop the cluster when the process that started 'up' exits")
	timeout := fs.Duration("timeout", 120*time.Second, "how long to wait for the control plane to become ready")
	nodeIP := fs.String("node-ip", "", "serve a node's pods ('testcluster node'): listen on every interface, "+
		"advertise this IP as the kubernetes service's endpoint, admit ServiceAccounts and run the controllers pods need")
	var apiserverArgs, kcmArgs, etcdArgs stringList
	fs.Var(&apiserverArgs, "apiserver-arg", "extra kube-apiserver flag, e.g. --apiserver-arg=--v=2 (repeatable)")
	fs.Var(&kcmArgs, "controller-manager-arg", "extra kube-controller-manager flag (repeatable)")
	fs.Var(&etcdArgs, "etcd-arg", "extra flag for 'testcluster etcd' (repeatable)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *nodeIP != "" && !flagGiven(fs, "controllers") {
		*controllers = strings.Join(nodeControllers, ",")
	}
	if *dirFlag == "" || fs.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: testcluster up --dir DIR [flags]")
		fs.PrintDefaults()
		return 2
	}
	dir, err := filepath.Abs(*dirFlag)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testcluster: %v\n", err)
		return 1
	}
	logf := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "testcluster: "+format+"\n", a...)
	}
	fail := func(format string, a ...any) int {
		logf(format, a...)
		return 1
	}

	// Stop on SIGTERM/SIGINT/SIGHUP, or when the process that started us dies.
	initialPPID := os.Getppid()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stopReason string
	var stopOnce sync.Once
	stopWith := func(reason string) { stopOnce.Do(func() { stopReason = reason; cancel() }) }
	go func() {
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case s := <-sigs:
				stopWith("received " + s.String())
			case <-t.C:
				if *exitWithParent && os.Getppid() != initialPPID {
					stopWith("parent process exited")
				}
			case <-ctx.Done():
				return
			}
		}
	}()

	// Re-execute this very binary for each component. /proc/self/exe keeps
	// working even if the file was replaced (e.g. by a rebuild) meanwhile.
	self := "/proc/self/exe"
	if _, err := os.Stat(self); err != nil {
		if self, err = os.Executable(); err != nil {
			return fail("cannot find own executable: %v", err)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail("%v", err)
	}
	etcdDir := filepath.Join(dir, "etcd-data")
	if !*keepData {
		if err := os.RemoveAll(etcdDir); err != nil {
			return fail("%v", err)
		}
	}
	p, err := writePKI(filepath.Join(dir, "pki"))
	if err != nil {
		return fail("certificates: %v", err)
	}
	ports, err := freePorts(4)
	if err != nil {
		return fail("%v", err)
	}
	etcdPort, etcdPeerPort, apiPort, kcmPort := ports[0], ports[1], ports[2], ports[3]
	if *securePort != 0 {
		apiPort = *securePort
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort)

	kubeconfig := filepath.Join(dir, "kubeconfig")
	kc := clientcmdapi.NewConfig()
	kc.Clusters["testcluster"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: p.caPEM}
	kc.AuthInfos["testcluster-admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: p.adminCertPEM, ClientKeyData: p.adminKeyPEM}
	kc.Contexts["testcluster"] = &clientcmdapi.Context{Cluster: "testcluster", AuthInfo: "testcluster-admin", Namespace: "default"}
	kc.CurrentContext = "testcluster"
	if err := clientcmd.WriteToFile(*kc, kubeconfig); err != nil {
		return fail("write kubeconfig: %v", err)
	}

	sup := newSupervisor(dir, logf)
	exitedCh := sup.exited
	start := func(name string, args ...string) (*child, error) { return sup.startSelf(self, name, args...) }
	byName := sup.byName
	shutdown := func() {
		var wg sync.WaitGroup
		for _, name := range []string{"kube-controller-manager", "kube-apiserver"} {
			if c := byName(name); c != nil {
				wg.Add(1)
				go func() { defer wg.Done(); c.stop(15 * time.Second) }()
			}
		}
		wg.Wait()
		byName("etcd").stop(10 * time.Second)
	}
	childDied := func(c *child) int {
		logf("%s exited unexpectedly (%v); last lines of %s:\n%s", c.name, c.err, c.log, tailFile(c.log, 30))
		shutdown()
		return 1
	}

	httpClient := func(tlsCfg *tls.Config) *http.Client {
		return &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsCfg, DisableKeepAlives: true}}
	}
	// waitOK polls url until it answers 200 with a body containing want.
	deadline := time.Now().Add(*timeout)
	waitOK := func(what string, hc *http.Client, url, want string) int {
		for {
			resp, err := hc.Get(url)
			if err == nil {
				body, _ := io.ReadAll(io.LimitReader(resp.Body, 64*1024))
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK && strings.Contains(string(body), want) {
					return 0
				}
			}
			if time.Now().After(deadline) {
				logf("%s not ready after %s (last error: %v)", what, *timeout, err)
				shutdown()
				return 1
			}
			select {
			case c := <-exitedCh:
				return childDied(c)
			case <-ctx.Done():
				logf("%s, stopping", stopReason)
				shutdown()
				return 0
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	t0 := time.Now()

	// etcd
	if _, err := start("etcd", append([]string{
		"--data-dir", etcdDir,
		"--listen-client-url", etcdURL,
		"--listen-peer-url", fmt.Sprintf("http://127.0.0.1:%d", etcdPeerPort),
	}, etcdArgs...)...); err != nil {
		shutdown()
		return fail("%v", err)
	}
	if rc := waitOK("etcd", httpClient(nil), etcdURL+"/health", `"health":"true"`); rc != 0 || ctx.Err() != nil {
		return rc
	}

	// kube-apiserver
	bind, advertise, reconciler := "127.0.0.1", "127.0.0.1", "none"
	admission := []string{"--disable-admission-plugins=ServiceAccount"}
	if *nodeIP != "" {
		// Pods reach the API server at the kubernetes service's ClusterIP, which kube-proxy
		// forwards to the endpoint the API server itself keeps (the lease reconciler).
		bind, advertise, reconciler, admission = "0.0.0.0", *nodeIP, "lease", nil
	}
	apiserverArgv := append(append([]string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=" + bind,
		"--advertise-address=" + advertise,
		"--secure-port=" + strconv.Itoa(apiPort),
		"--endpoint-reconciler-type=" + reconciler,
		"--tls-cert-file=" + p.ServingCert,
		"--tls-private-key-file=" + p.ServKey,
		"--client-ca-file=" + p.CACert,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.ServiceAccountKey,
		"--service-account-signing-key-file=" + p.ServiceAccountKey,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--authorization-mode=RBAC",
		"--allow-privileged=true",
		"--cert-dir=" + filepath.Join(dir, "kube-apiserver"),
	}, admission...), apiserverArgs...)
	if _, err := start("kube-apiserver", apiserverArgv...); err != nil {
		shutdown()
		return fail("%v", err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(p.caPEM)
	adminPair, err := tls.X509KeyPair(p.adminCertPEM, p.adminKeyPEM)
	if err != nil {
		shutdown()
		return fail("admin key pair: %v", err)
	}
	apiClient := httpClient(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{adminPair}})
	if rc := waitOK("kube-apiserver", apiClient, server+"/readyz", "ok"); rc != 0 || ctx.Err() != nil {
		return rc
	}

	// kube-controller-manager (started once the apiserver is ready: it reads
	// its authentication configuration from the apiserver at startup).
	if !*noKCM {
		if _, err := start("kube-controller-manager", append([]string{
			"--kubeconfig=" + kubeconfig,
			"--authentication-kubeconfig=" + kubeconfig,
			"--authorization-kubeconfig=" + kubeconfig,
			"--controllers=" + *controllers,
			"--leader-elect=false",
			"--use-service-account-credentials=false",
			"--bind-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(kcmPort),
			"--cert-dir=" + filepath.Join(dir, "kube-controller-manager"),
		}, kcmArgs...)...); err != nil {
			shutdown()
			return fail("%v", err)
		}
		kcmClient := httpClient(&tls.Config{InsecureSkipVerify: true}) // self-signed serving cert
		if rc := waitOK("kube-controller-manager", kcmClient, fmt.Sprintf("https://127.0.0.1:%d/healthz", kcmPort), "ok"); rc != 0 || ctx.Err() != nil {
			return rc
		}
	}

	writeState := func() {
		state := map[string]any{
			"server": server, "kubeconfig": kubeconfig, "etcd": etcdURL, "pid": os.Getpid(),
		}
		for _, c := range sup.children {
			state[c.name+"_pid"] = c.cmd.Process.Pid
		}
		if b, err := json.MarshalIndent(state, "", "  "); err == nil {
			// written whole, then renamed: a reader polling it during a restart never sees half
			tmp := filepath.Join(dir, "state.json.tmp")
			if os.WriteFile(tmp, append(b, '\n'), 0o644) == nil {
				_ = os.Rename(tmp, filepath.Join(dir, "state.json"))
			}
		}
	}
	writeState()
	logf("ready after %.1fs", time.Since(t0).Seconds())
	fmt.Printf("READY kubeconfig=%s server=%s\n", kubeconfig, server)
	os.Stdout.Sync()

	// SIGUSR1 restarts the API server on the same port, certificates and etcd data: what a
	// control-plane upgrade or crash looks like to its clients (the e2e tier's fault).
	restarts := make(chan os.Signal, 1)
	signal.Notify(restarts, syscall.SIGUSR1)
	for {
		select {
		case c := <-exitedCh:
			return childDied(c)
		case <-restarts:
			old := byName("kube-apiserver")
			logf("SIGUSR1: restarting kube-apiserver (pid %d)", old.cmd.Process.Pid)
			began := time.Now()
			old.stop(15 * time.Second)
			for c := range exitedCh { // its own exit is expected; any other child's is not
				if c == old {
					break
				}
				return childDied(c)
			}
			sup.forget(old)
			if _, err := start("kube-apiserver", apiserverArgv...); err != nil {
				shutdown()
				return fail("%v", err)
			}
			deadline = time.Now().Add(*timeout)
			if rc := waitOK("kube-apiserver", apiClient, server+"/readyz", "ok"); rc != 0 || ctx.Err() != nil {
				return rc
			}
			writeState()
			logf("kube-apiserver restarted, ready after %.1fs", time.Since(began).Seconds())
			fmt.Printf("RESTARTED kube-apiserver seconds=%.1f\n", time.Since(began).Seconds())
			os.Stdout.Sync()
		case <-ctx.Done():
			logf("%s, stopping", stopReason)
			shutdown()
			logf("stopped")
			return 0
		}
	}
}
