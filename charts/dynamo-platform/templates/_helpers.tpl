{{- define "dynamo-platform.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dynamo-platform.serviceAccountName" -}}
{{- default (include "dynamo-platform.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "dynamo-platform.selectorLabels" -}}
app.kubernetes.io/name: dynamo-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dynamo-platform.labels" -}}
{{ include "dynamo-platform.selectorLabels" . }}
app.kubernetes.io/part-of: dynamo-platform
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dynamo-platform.topologyLevels" -}}
{{- $levels := list -}}
{{- range .Values.topologyLevels -}}
{{- $levels = append $levels (printf "%s=%s" .name .label) -}}
{{- end -}}
{{- join "," $levels -}}
{{- end -}}
