{{/*
Names are fixed: the operator looks for its Lease and applies the agent DaemonSet and its
ServiceAccount under these names, and the RBAC objects are cluster-wide. One release of this
chart per cluster.
*/}}
{{- define "marklb.operatorName" -}}marklb-operator{{- end -}}
{{- define "marklb.agentName" -}}marklb-agent{{- end -}}

{{/* Labels every object of the release carries. */}}
{{- define "marklb.labels" -}}
app.kubernetes.io/part-of: marklb
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* An image reference: repository and tag, the tag defaulting to the chart's appVersion. */}}
{{- define "marklb.image" -}}
{{- $image := index . 0 -}}{{- $root := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{/* Whether the Prometheus operator's API is served. */}}
{{- define "marklb.prometheusOperator" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}
