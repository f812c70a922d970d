{{/* Name of the chart, overridable. */}}
{{- define "distillation-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, unless the release name already contains the chart name. */}}
{{- define "distillation-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "distillation-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distillation-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "distillation-operator.labels" -}}
{{ include "distillation-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distillation-operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "distillation-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "distillation-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
What the operator calls in a namespace it watches: exactly these, nothing more.
Used by the ClusterRole (cluster-wide mode) and by each Role (watchNamespaces mode).
*/}}
{{- define "distillation-operator.namespacedRules" -}}
# Its own resource: watch Distillations, record kopf's progress in annotations (patch),
# write status, and set ownerReferences with blockOwnerDeletion on children (finalizers).
- apiGroups: ["distillation.dev"]
  resources: ["distillations"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["distillation.dev"]
  resources: ["distillations/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["distillation.dev"]
  resources: ["distillations/finalizers"]
  verbs: ["update"]
# One KubeRay RayJob per stage: created, followed, suspended/resumed, replaced on spec change.
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# The KServe InferenceService or LLMInferenceService that serves the student once it passes
# its gate (spec.serve.api).
- apiGroups: ["serving.kserve.io"]
  resources: ["inferenceservices"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["serving.kserve.io"]
  resources: ["llminferenceservices"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# Events on Distillations (kopf posts handler outcomes; the operator posts stage transitions).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
