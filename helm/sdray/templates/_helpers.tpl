{{/* Names, labels and the settings several templates share. */}}

{{- define "sdray.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sdray.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sdray.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sdray.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "sdray.jobNamespace" -}}
{{- default .Release.Namespace .Values.jobNamespace -}}
{{- end -}}

{{/* Where jobs run: the job namespace and every namespace the tenant policy gives a tenant (a JSON list). */}}
{{- define "sdray.jobNamespaces" -}}
{{- $all := list (include "sdray.jobNamespace" .) -}}
{{- with .Values.policy -}}
{{- with .default -}}{{- with .namespace -}}{{- $all = append $all . -}}{{- end -}}{{- end -}}
{{- range $tenant, $rules := .tenants -}}{{- with $rules -}}{{- with .namespace -}}{{- $all = append $all . -}}{{- end -}}{{- end -}}{{- end -}}
{{- end -}}
{{- $all | uniq | toJson -}}
{{- end -}}

{{/* The namespaces the controller watches: a list, empty for every namespace. */}}
{{- define "sdray.watchNamespaces" -}}
{{- if kindIs "invalid" .Values.controller.watchNamespaces -}}
{{- include "sdray.jobNamespaces" . -}}
{{- else -}}
{{- .Values.controller.watchNamespaces | toJson -}}
{{- end -}}
{{- end -}}

{{/* The controller's --pod-defaults file (sdray/k8s/defaults.py): jobPods, with the chart's imagePullSecrets
when jobPods.imagePullSecrets is null, and the job ServiceAccount's annotations. */}}
{{- define "sdray.podDefaults" -}}
{{- $pods := .Values.jobPods -}}
{{- $secrets := $pods.imagePullSecrets -}}
{{- if kindIs "invalid" $secrets -}}{{- $secrets = .Values.imagePullSecrets -}}{{- end -}}
{{- $out := dict "serviceAccountAnnotations" .Values.jobServiceAccount.annotations "imagePullSecrets" $secrets
  "annotations" $pods.annotations "labels" $pods.labels "affinity" $pods.affinity
  "topologySpreadConstraints" $pods.topologySpreadConstraints "volumes" $pods.volumes
  "volumeMounts" $pods.volumeMounts "acceleratorResource" $pods.acceleratorResource
  "runtimeClassName" $pods.runtimeClassName "schedulerName" $pods.schedulerName
  "priorityClassName" $pods.priorityClassName -}}
{{- toYaml $out -}}
{{- end -}}

{{/* auto: only when the Prometheus operator's API is served; otherwise the value itself. */}}
{{- define "sdray.monitoring" -}}
{{- $want := toString .want -}}
{{- if or (eq $want "true") (and (eq $want "auto") (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end -}}
{{- end -}}

{{/* Non-root, read-only root filesystem, no capabilities: the pod and container security contexts. */}}
{{- define "sdray.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "sdray.containerSecurity" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Writable places under a read-only root: HOME and caches go to /tmp. */}}
{{- define "sdray.tmpEnv" -}}
- name: HOME
  value: /tmp
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: SDRAY_CACHE_DIR
  value: /tmp/sdray-cache
{{- end -}}

{{/* What the controller does in a job namespace (sdray/k8s/controller.py), verb by verb. Each job gets its own
ServiceAccount, Role and RoleBinding (patch on its own diffusionjobs/status) and NetworkPolicy: the API server
lets the controller grant that Role only because it holds diffusionjobs/status patch itself. Events are
events.k8s.io/v1 (create; patch counts up a repeated one's series). */}}
{{- define "sdray.controllerRules" -}}
- apiGroups: [sdray.io]
  resources: [diffusionjobs]
  verbs: [get, list, watch]
- apiGroups: [sdray.io]
  resources: [diffusionjobs/status]
  verbs: [patch]
- apiGroups: [ray.io]
  resources: [rayjobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, update]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
