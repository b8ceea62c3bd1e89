{{/*
Shared by every Fabrik service chart (charts/<service>/templates/_helpers.tpl are identical;
tests/deploy checks that they stay so).
*/}}

{{/* The service's name: fabrik-<component>; also the name of its ServiceAccount. */}}
{{- define "fabrik.fullname" -}}
{{- default (printf "fabrik-%s" .Values.component) .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Namespace of the services: global.systemNamespace, else the release's. */}}
{{- define "fabrik.namespace" -}}
{{- default .Release.Namespace ((.Values.global).systemNamespace) -}}
{{- end -}}

{{- define "fabrik.runsNamespace" -}}
{{- default "fabrik-runs" ((.Values.global).runsNamespace) -}}
{{- end -}}

{{- define "fabrik.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fabrik.fullname" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fabrik.labels" -}}
{{ include "fabrik.selectorLabels" . }}
app.kubernetes.io/component: {{ .Values.component }}
app.kubernetes.io/part-of: fabrik
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The image, by digest when one is given (repository:tag@sha256:...). */}}
{{- define "fabrik.image" -}}
{{- $registry := default .Values.image.registry ((.Values.global).imageRegistry) -}}
{{- $repo := ternary (printf "%s/%s" $registry .Values.image.repository) .Values.image.repository (ne $registry "") -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" $repo $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* FABRIK_NATS_URL, with this service's NATS user when NATS authentication is on. */}}
{{- define "fabrik.natsEnv" -}}
{{- $auth := default dict ((.Values.global).natsAuth) -}}
{{- $url := default "nats://nats:4222" ((.Values.global).natsUrl) -}}
{{- if .Values.natsUrl }}{{ $url = .Values.natsUrl }}{{ end -}}
{{- if $auth.enabled }}
- name: NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $auth.secretName | default "fabrik-nats-users" }}
      key: {{ .Values.component }}
- name: FABRIK_NATS_URL
  value: {{ $url | replace "nats://" (printf "nats://%s:$(NATS_PASSWORD)@" (include "fabrik.fullname" .)) | quote }}
{{- else }}
- name: FABRIK_NATS_URL
  value: {{ $url | quote }}
{{- end }}
{{- end -}}
