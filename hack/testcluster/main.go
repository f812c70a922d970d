// Command testcluster is a multi-call binary that bundles a minimal Kubernetes
// control plane for tests: etcd (embedded), kube-apiserver,
// kube-controller-manager and kubectl, plus an "up" command that runs them
// together as child processes.
//
// Dispatch is on the first argument (testcluster kubectl get ns) or, when the
// binary is invoked through a symlink, on the name it was invoked as
// (kubectl get ns).
package main

import (
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
)

const usage = `usage: testcluster COMMAND [ARGS...]

commands:
  up --dir DIR [flags]         start etcd, kube-apiserver and kube-controller-manager
                               (see: testcluster up --help)
  etcd [flags]                 run an embedded etcd (see: testcluster etcd --help)
  kube-apiserver [flags]       upstream kube-apiserver
  kube-controller-manager ...  upstream kube-controller-manager
  kubectl [args]               upstream kubectl
  version                      print the bundled Kubernetes version
`

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	switch name {
	case "kubectl", "kube-apiserver", "kube-controller-manager", "etcd":
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
