// Command testcluster is a multi-call binary that bundles a minimal Kubernetes
// control plane for tests: etcd (embedded), kube-apiserver,
// kube-controller-manager and kubectl, plus an "up" command that runs them
// together as child processes; and the parts of a node (kubelet, kube-scheduler,
// kube-proxy) with a "node" command that runs them beside containerd.
//
// Dispatch is on the first argument (testcluster kubectl get ns) or, when the
// binary is invoked through a symlink, on the name it was invoked as
// (kubectl get ns).
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata" // for timeZone support in CronJob, as upstream mains do

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go prometheus plugins
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric registration
	"k8s.io/component-base/version"

	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl client auth plugins
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"

	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxyapp "k8s.io/kubernetes/cmd/kube-proxy/app"
	schedulerapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubeletapp "k8s.io/kubernetes/cmd/kubelet/app"
)

const usage = `usage: testcluster COMMAND [ARGS...]

commands:
  up --dir DIR [flags]         start etcd, kube-apiserver and kube-controller-manager
                               (see: testcluster up --help)
  etcd [flags]                 run an embedded etcd (see: testcluster etcd --help)
  kube-apiserver [flags]       upstream kube-apiserver
  kube-controller-manager ...  upstream kube-controller-manager
  kubectl [args]               upstream kubectl
  node --dir DIR --kubeconfig K [flags]
                               a node beside 'up': containerd, kubelet, kube-scheduler,
                               kube-proxy, CoreDNS (see: testcluster node --help)
  node-clean --dir DIR         undo what a killed 'node' left (pods, mounts, rules, bridge)
  image-from-binary [flags]    pack a static binary as an OCI image archive
  kubelet, kube-scheduler, kube-proxy [flags]   upstream commands, unchanged
  version                      print the bundled Kubernetes version
`

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	switch name {
	case "kubectl", "kube-apiserver", "kube-controller-manager", "etcd", "kubelet", "kube-scheduler", "kube-proxy":
		// invoked through a symlink named after the component
	default:
		if len(args) == 0 {
			fmt.Fprint(os.Stderr, usage)
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}
	// The upstream commands read os.Args (cobra, kubectl plugin handling),
	// so present them with the arguments they would get as standalone binaries.
	os.Args = append([]string{name}, args...)

	switch name {
	case "kube-apiserver":
		startParentWatchdog()
		os.Exit(cli.Run(apiserverapp.NewAPIServerCommand()))
	case "kube-controller-manager":
		startParentWatchdog()
		os.Exit(cli.Run(kcmapp.NewControllerManagerCommand()))
	case "kubelet":
		startParentWatchdog()
		os.Exit(cli.Run(kubeletapp.NewKubeletCommand(context.Background())))
	case "kube-scheduler":
		startParentWatchdog()
		os.Exit(cli.Run(schedulerapp.NewSchedulerCommand()))
	case "kube-proxy":
		startParentWatchdog()
		os.Exit(cli.Run(proxyapp.NewProxyCommand()))
	case "node":
		os.Exit(runNode(args))
	case "node-clean":
		os.Exit(runNodeClean(args))
	case "image-from-binary":
		os.Exit(runImageFromBinary(args))
	case "kubectl":
		runKubectl()
	case "etcd":
		startParentWatchdog()
		os.Exit(runEtcd(args))
	case "up":
		os.Exit(runUp(args))
	case "version", "--version":
		fmt.Println(version.Get().GitVersion)
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "testcluster: unknown command %q\n\n%s", name, usage)
		os.Exit(2)
	}
}

// runKubectl mirrors k8s.io/kubernetes/cmd/kubectl/kubectl.go.
func runKubectl() {
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
	}
	os.Exit(0)
}
