{{- define "kube-zerocopy.fullname" -}}
{{- if contains "kube-zerocopy" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-kube-zerocopy" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kube-zerocopy.serviceAccountName" -}}
{{- default (include "kube-zerocopy.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kube-zerocopy.labels" -}}
app.kubernetes.io/name: kube-zerocopy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "kube-zerocopy.selectorLabels" -}}
app.kubernetes.io/name: kube-zerocopy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kube-zerocopy.agentLabels" -}}
app.kubernetes.io/name: kube-zerocopy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "kube-zerocopy.agentSelectorLabels" -}}
app.kubernetes.io/name: kube-zerocopy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}
