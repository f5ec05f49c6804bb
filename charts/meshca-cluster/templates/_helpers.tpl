{{/* Labels every object of this chart carries. */}}
{{- define "meshca.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: meshca
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ .root.Chart.Name }}-{{ .root.Chart.Version }}
{{- end -}}

{{/* The agent keeps its identity in meshca-system (a fixed name the agent looks for). */}}
{{- define "meshca.namespace" -}}
{{- if ne .Release.Namespace "meshca-system" -}}
{{- fail (printf "install meshca-cluster into the namespace meshca-system (helm install -n meshca-system), not %q: the agent keeps its identity there" .Release.Namespace) -}}
{{- end -}}
meshca-system
{{- end -}}
