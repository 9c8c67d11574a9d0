{{/* Names and labels shared by every template. */}}

{{- define "circuitwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* RELEASE-NAME, unless the release name already contains the chart name. */}}
{{- define "circuitwatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "circuitwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "circuitwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "circuitwatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "circuitwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "circuitwatch.specConfigMap" -}}
{{- default (printf "%s-spec" (include "circuitwatch.fullname" .)) .Values.spec.existingConfigMap }}
{{- end }}

{{/* The ingest address both containers use: a Unix socket in the shared volume. */}}
{{- define "circuitwatch.endpoint" -}}
{{- printf "unix://%s/ingest.sock" .Values.sidecar.socketDir }}
{{- end }}

{{/* Exec health probe: files/healthcheck.py asks grpc.health.v1 over the socket. */}}
{{- define "circuitwatch.healthProbe" -}}
exec:
  command:
    - {{ .Values.sidecar.python }}
    - -c
    - {{ .Files.Get "files/healthcheck.py" | toJson }}
    - {{ include "circuitwatch.endpoint" . }}
    - {{ .Values.sidecar.probes.timeoutSeconds | quote }}
timeoutSeconds: {{ add .Values.sidecar.probes.timeoutSeconds 1 }}
{{- end }}

{{/* The scrape endpoints' relabeling that the alerting rules rely on. */}}
{{- define "circuitwatch.targetLabel" -}}
relabelings:
  - action: replace
    targetLabel: circuitwatch
    replacement: {{ . }}
{{- end }}
