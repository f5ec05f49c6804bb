{{/* Labels every object of this chart carries. */}}
{{- define "meshca.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: meshca
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ .root.Chart.Name }}-{{ .root.Chart.Version }}
{{- end -}}

{{/* The management plane keeps its state in `meshca` (its store's namespace is fixed). */}}
{{- define "meshca.namespace" -}}
{{- if ne .Release.Namespace "meshca" -}}
{{- fail (printf "install meshca-management into the namespace meshca (helm install -n meshca), not %q: the management plane keeps its state there" .Release.Namespace) -}}
{{- end -}}
meshca
{{- end -}}
