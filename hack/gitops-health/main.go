// Command gitops-health prints how Argo CD and Flux (kstatus) judge one Distillation.
//
//	gitops-health --argocd-cm argocd-cm.yaml [object.json | -]
//
// It reads the object as JSON (a file, or stdin when absent or "-") and prints
//
//	{"argocd": {"status": ..., "message": ...}, "kstatus": {"status": ..., "message": ...}}
//
// Both verdicts come from the tools' own code, not from a re-implementation:
//
//   - Argo CD: the ConfigMap is served by a fake clientset to Argo CD's SettingsManager, whose
//     GetResourceOverrides parses the resource.customizations.* keys as the application
//     controller does; the object's health is then gitops-engine's GetResourceHealth with
//     util/lua's ResourceHealthOverrides, the call controller/health.go makes. A key that does
//     not match the object's group and kind thus yields no health at all (exit 1), as in Argo CD.
//   - kstatus: sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute on the unstructured object, the
//     verdict Flux's health checks use.
//
// Exit status: 0 with the JSON on stdout (a failing health script is Argo CD's Unknown, with
// the error as message); 1 when a verdict cannot be computed (bad input, an argocd-cm Argo CD
// would not read, no health check for the object's kind), with the reason on stderr.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/argoproj/argo-cd/gitops-engine/pkg/health"
	"github.com/argoproj/argo-cd/v3/util/lua"
	"github.com/argoproj/argo-cd/v3/util/settings"
	log "github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

// Verdict is one tool's judgement of the object.
type Verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

// Report is what the command prints.
type Report struct {
	ArgoCD  Verdict `json:"argocd"`
	KStatus Verdict `json:"kstatus"`
}

func main() {
	log.SetLevel(log.WarnLevel) // the settings informers log their start at info level
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "gitops-health:", err)
		os.Exit(1)
	}
}

func run(args []string, stdin io.Reader, stdout io.Writer) error {
	flags := flag.NewFlagSet("gitops-health", flag.ContinueOnError)
	cmPath := flags.String("argocd-cm", "", "argocd-cm ConfigMap (YAML or JSON) holding the health check")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if *cmPath == "" || flags.NArg() > 1 {
		return errors.New("usage: gitops-health --argocd-cm FILE [OBJECT.json | -]")
	}
	obj, err := readObject(flags.Arg(0), stdin)
	if err != nil {
		return err
	}
	argo, err := argoHealth(*cmPath, obj)
	if err != nil {
		return err
	}
	computed, err := status.Compute(obj)
	if err != nil {
		return fmt.Errorf("kstatus: %w", err)
	}
	report := Report{ArgoCD: argo, KStatus: Verdict{computed.Status.String(), computed.Message}}
	encoder := json.NewEncoder(stdout)
	encoder.SetIndent("", "  ")
	encoder.SetEscapeHTML(false)
	return encoder.Encode(report)
}

// readObject decodes the object the way client-go does, so whole numbers such as
// metadata.generation are int64 (kstatus and Argo CD's Lua conversion read them as such).
func readObject(path string, stdin io.Reader) (*unstructured.Unstructured, error) {
	var data []byte
	var err error
	if path == "" || path == "-" {
		data, err = io.ReadAll(stdin)
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, fmt.Errorf("reading the object: %w", err)
	}
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(data); err != nil {
		return nil, fmt.Errorf("decoding the object (JSON with apiVersion and kind): %w", err)
	}
	return obj, nil
}

// argoHealth is Argo CD's verdict: the overrides as SettingsManager reads them from argocd-cm,
// then gitops-engine's health with util/lua's overrides.
func argoHealth(cmPath string, obj *unstructured.Unstructured) (Verdict, error) {
	data, err := os.ReadFile(cmPath)
	if err != nil {
		return Verdict{}, fmt.Errorf("reading argocd-cm: %w", err)
	}
	cm := &corev1.ConfigMap{}
	if err := yaml.UnmarshalStrict(data, cm); err != nil {
		return Verdict{}, fmt.Errorf("decoding argocd-cm: %w", err)
	}
	if cm.Name != "argocd-cm" || cm.Namespace == "" {
		return Verdict{}, fmt.Errorf("the ConfigMap is %s/%s: Argo CD reads argocd-cm in its own namespace", cm.Namespace, cm.Name)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	manager := settings.NewSettingsManager(ctx, fake.NewClientset(cm), cm.Namespace)
	overrides, err := manager.GetResourceOverrides()
	if err != nil {
		return Verdict{}, fmt.Errorf("argocd-cm: %w", err)
	}
	// A script that fails (a Lua error, a bad return value) comes back as Argo CD shows it:
	// Unknown with the error as message, beside the error itself.
	verdict, err := health.GetResourceHealth(obj, lua.ResourceHealthOverrides(overrides))
	if verdict == nil {
		if err != nil {
			return Verdict{}, fmt.Errorf("argo cd: %w", err)
		}
		gvk := obj.GroupVersionKind()
		return Verdict{}, fmt.Errorf("argo cd has no health check for %s/%s in this argocd-cm", gvk.Group, gvk.Kind)
	}
	return Verdict{string(verdict.Status), verdict.Message}, nil
}
