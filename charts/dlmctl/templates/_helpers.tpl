{{/* The release's full name: the release name, with the chart's name unless it already contains it. */}}
{{- define "dlmctl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's Deployment, Service, ClusterRole and binding: <fullname>-operator. */}}
{{- define "dlmctl.operator" -}}
{{- printf "%s-operator" (include "dlmctl.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "dlmctl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dlmctl.operator" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The API service's Deployment, Service, Ingress, ClusterRole and binding: <fullname>-service. */}}
{{- define "dlmctl.service" -}}
{{- printf "%s-service" (include "dlmctl.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{- define "dlmctl.serviceServiceAccountName" -}}
{{- with .Values.service.serviceAccount -}}
{{- if .create -}}
{{- default (include "dlmctl.service" $) .name -}}
{{- else -}}
{{- required "service.serviceAccount.name: required when service.serviceAccount.create is false" .name -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dlmctl.peering" -}}
{{- default (include "dlmctl.fullname" .) .Values.operator.peering -}}
{{- end -}}

{{- define "dlmctl.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret with the S3 credentials; optional unless named in s3.credentials.existingSecret. */}}
{{- define "dlmctl.s3Secret" -}}
{{- default (printf "%s-s3-credentials" (include "dlmctl.fullname" .)) .Values.s3.credentials.existingSecret -}}
{{- end -}}

{{/* ServiceMonitor/PodMonitor (true) or prometheus.io annotations (false). */}}
{{- define "dlmctl.prometheusOperator" -}}
{{- $mode := .Values.monitoring.mode -}}
{{- if or (eq $mode "prometheus-operator") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end -}}
{{- end -}}

{{- define "dlmctl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dlmctl
{{- end -}}

{{- define "dlmctl.operatorSelector" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "dlmctl.operatorLabels" -}}
{{ include "dlmctl.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}


{{- define "dlmctl.serviceSelector" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: service
{{- end -}}

{{- define "dlmctl.serviceLabels" -}}
{{ include "dlmctl.labels" . }}
app.kubernetes.io/component: service
{{- end -}}

{{/* Where clients reach the API service: the Ingress's host, else the Service's cluster DNS name. */}}
{{- define "dlmctl.serviceURL" -}}
{{- with .Values.service.ingress -}}
{{- if and .enabled .host -}}
{{- printf "%s://%s" (ternary "https" "http" (ne .tls.secretName "")) .host -}}
{{- end -}}
{{- end -}}
{{- if not (and .Values.service.ingress.enabled .Values.service.ingress.host) -}}
{{- $port := int .Values.service.port -}}
{{- printf "http://%s.%s.svc%s" (include "dlmctl.service" .) .Release.Namespace (ternary "" (printf ":%d" $port) (eq $port 80)) -}}
{{- end -}}
{{- end -}}
