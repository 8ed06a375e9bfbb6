{{/* Names and labels. */}}
{{- define "livemesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "livemesh.fullname" -}}
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

{{- define "livemesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "livemesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: livemesh
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "counter"). */}}
{{- define "livemesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "livemesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "livemesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "livemesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "livemesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "livemesh.storesSecret" -}}
{{- default (printf "%s-stores" (include "livemesh.fullname" .)) .Values.stores.existingSecret -}}
{{- end -}}

{{- define "livemesh.scheme" -}}
{{- if .Values.auth.tls.enabled }}https{{ else }}http{{ end -}}
{{- end -}}

{{/* The URL peers call a component at: (dict "root" $ "component" "publish"). */}}
{{- define "livemesh.url" -}}
{{- printf "%s://%s-%s:%v" (include "livemesh.scheme" .root) (include "livemesh.fullname" .root) .component .root.Values.ports.grpc -}}
{{- end -}}

{{/*
The five services: what each runs, what it calls, and who may call it.
`mesh` and `roles` mirror crates/mesh/src/auth/policy.rs (RULES): the mesh
services whose tokens the policy admits to at least one RPC of the service,
and the roles of callers outside the mesh. The test command compares them
with the policy table.
*/}}
{{- define "livemesh.components" -}}
ongoing-query:
  key: ongoingQuery
  kind: StatefulSet
  binary: livemesh-ongoing-query
  peers: []
  stores: {LIVEMESH_DATABASE_URL: rooms-url}
  mesh: [ongoing-query, subscribe, publish, counter, gift-settler]
  roles: [bff, admin]
publish:
  key: publish
  kind: Deployment
  binary: livemesh-publish
  peers: [{env: LIVEMESH_PUBLISH__ONGOING_QUERY_URL, to: ongoing-query}]
  stores: {LIVEMESH_REDIS_URL: redis-url}
  mesh: [subscribe, publish, counter, gift-settler]
  roles: [bff]
subscribe:
  key: subscribe
  kind: StatefulSet
  binary: livemesh-subscribe
  peers:
    - {env: LIVEMESH_SUBSCRIBE__ONGOING_QUERY_URL, to: ongoing-query}
    - {env: LIVEMESH_SUBSCRIBE__PUBLISH_URL, to: publish}
  stores: {LIVEMESH_REDIS_URL: redis-url}
  mesh: [publish]
  roles: [bff]
counter:
  key: counter
  kind: Deployment
  binary: livemesh-counter
  peers:
    - {env: LIVEMESH_COUNTER__ONGOING_QUERY_URL, to: ongoing-query}
    - {env: LIVEMESH_COUNTER__PUBLISH_URL, to: publish}
  stores: {LIVEMESH_REDIS_URL: redis-url, LIVEMESH_COUNTER__DATABASE_URL: counter-url}
  mesh: [ongoing-query, subscribe, publish, counter, gift-settler]
  roles: [bff]
gift-settler:
  key: giftSettler
  kind: Deployment
  binary: livemesh-gift-settler
  peers:
    - {env: LIVEMESH_GIFTS__ONGOING_QUERY_URL, to: ongoing-query}
    - {env: LIVEMESH_GIFTS__PUBLISH_URL, to: publish}
  stores: {LIVEMESH_GIFTS__SHARD_URLS: shard-urls}
  mesh: []
  roles: [bff, finance, payments]
{{- end -}}

{{/* Environment and mounts every livemesh container shares (the test pod too). */}}
{{- define "livemesh.commonEnv" -}}
- name: LIVEMESH_CONFIG
  value: /etc/livemesh/config/livemesh.toml
- name: LIVEMESH_AUTH__MODE
  value: {{ .Values.auth.mode | quote }}
{{- if .Values.auth.tokenSecret.existingSecret }}
- name: LIVEMESH_AUTH__TOKEN_SECRET_FILE
  value: /etc/livemesh/token/token-secret
{{- end }}
{{- if .Values.auth.tls.enabled }}
- name: LIVEMESH_AUTH__TLS_CERT
  value: /etc/livemesh/tls/tls.crt
- name: LIVEMESH_AUTH__TLS_KEY
  value: /etc/livemesh/tls/tls.key
- name: LIVEMESH_AUTH__TLS_CA
  value: /etc/livemesh/tls/ca.crt
{{- with .Values.auth.tls.domain }}
- name: LIVEMESH_AUTH__TLS_DOMAIN
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "livemesh.commonMounts" -}}
- name: config
  mountPath: /etc/livemesh/config
  readOnly: true
{{- if .Values.auth.tokenSecret.existingSecret }}
- name: token
  mountPath: /etc/livemesh/token
  readOnly: true
{{- end }}
{{- if .Values.auth.tls.enabled }}
- name: tls
  mountPath: /etc/livemesh/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "livemesh.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "livemesh.fullname" . }}-config
{{- if .Values.auth.tokenSecret.existingSecret }}
- name: token
  secret:
    secretName: {{ .Values.auth.tokenSecret.existingSecret }}
    items:
      - {key: token-secret, path: token-secret}
{{- end }}
{{- if .Values.auth.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "auth.tls.existingSecret must name the Secret with tls.crt, tls.key and ca.crt when auth.tls.enabled" .Values.auth.tls.existingSecret }}
{{- end }}
{{- end -}}
