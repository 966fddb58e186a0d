{{/* Names and labels shared by every object of a release. */}}

{{- define "smmf.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "smmf.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* A model's name as a Kubernetes name: lower case, [a-z0-9-]. */}}
{{- define "smmf.modelSlug" -}}
{{- regexReplaceAll "[^a-z0-9-]+" (lower .) "-" | trunc 40 | trimAll "-" -}}
{{- end -}}

{{/* The Redis lists behind a model's queue (keys.queue_lanes): the queue, then its batch lane
     after kombu's separator "\x06\x16". Argument: the worker entry. */}}
{{- define "smmf.queueLanes" -}}
{{- $queue := printf "smmf.%s.%s" .kind (regexReplaceAll "[^A-Za-z0-9._-]" .model "_") -}}
{{- list $queue (printf "%s\x06\x169" $queue) | toJson -}}
{{- end -}}

{{- define "smmf.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "smmf.fullname" . }}-redis:6379/0
{{- else -}}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "smmf.redisAddress" -}}
{{- if .Values.redis.enabled -}}
{{ include "smmf.fullname" . }}-redis:6379
{{- else -}}
{{- required "redis.external.address (host:port, for KEDA) is required when redis.enabled is false" .Values.redis.external.address -}}
{{- end -}}
{{- end -}}

{{/* What every smmf-queue container shares: its environment items (the config file, Redis,
     JSON logs), the Secret's variables, and the config's mount. */}}
{{- define "smmf.env" -}}
- name: SMMF_CONFIG
  value: /etc/smmf/smmf.toml
- name: SMMF_QUEUE__BROKER_URL
  value: {{ include "smmf.redisUrl" . | quote }}
- name: SMMF_QUEUE__REDIS_URL
  value: {{ include "smmf.redisUrl" . | quote }}
- name: SMMF_QUEUE__EMBEDDED_REDIS
  value: "false"
- name: SMMF_LOG_FORMAT
  value: json
{{- end -}}

{{- define "smmf.envFrom" -}}
{{- if or .Values.secrets .Values.existingSecret -}}
envFrom:
  - secretRef:
      name: {{ .Values.existingSecret | default (printf "%s-env" (include "smmf.fullname" .)) }}
{{- end -}}
{{- end -}}

{{- define "smmf.configMount" -}}
- name: config
  mountPath: /etc/smmf
  readOnly: true
{{- end -}}

{{- define "smmf.configVolume" -}}
- name: config
  configMap:
    name: {{ include "smmf.fullname" . }}-config
{{- end -}}
