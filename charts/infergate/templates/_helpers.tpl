{{/* registry/name:tag of one of infergate's images. */}}
{{- define "infergate.image" -}}
{{- $digest := get (.root.Values.images.digests | default dict) .name -}}
{{- if $digest -}}
{{- printf "%s/%s@%s" .root.Values.images.registry .name $digest -}}
{{- else -}}
{{- $tag := .root.Values.images.tag | default .root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" .root.Values.images.registry .name $tag -}}
{{- end -}}
{{- end -}}

{{- define "infergate.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/part-of: infergate
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "infergate.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* The pod and container hardening every infergate pod gets. */}}
{{- define "infergate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "infergate.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The downward-API variables both binaries read. */}}
{{- define "infergate.podEnv" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef: {fieldPath: metadata.namespace}
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
{{- end -}}

{{- define "infergate.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A label map as the operator's flags take it: k=v,k=v, sorted. */}}
{{- define "infergate.labelList" -}}
{{- $pairs := list -}}
{{- range $key, $value := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* Pods allowed to scrape a metrics port: the configured scraper, else anyone. */}}
{{- define "infergate.scraperPeer" -}}
{{- with .Values.metrics.scraper.namespaceLabels }}
from:
  - namespaceSelector:
      matchLabels:
        {{- toYaml . | nindent 8 }}
    podSelector:
      matchLabels:
        {{- toYaml $.Values.metrics.scraper.podLabels | nindent 8 }}
{{- end }}
{{- end -}}

{{/*
Where clients reach the proxy: proxy.externalUrl, else the ingress host, else the proxy
Service's in-cluster address.
*/}}
{{- define "infergate.proxyUrl" -}}
{{- $p := .Values.proxy -}}
{{- if $p.externalUrl -}}
{{- trimSuffix "/" $p.externalUrl -}}
{{- else if and $p.ingress.enabled $p.ingress.host -}}
{{- ternary "https" "http" (ne $p.ingress.tlsSecretName "") }}://{{ $p.ingress.host -}}
{{- else -}}
http://infergate-proxy.{{ .Release.Namespace }}.svc{{ if ne (int $p.service.port) 80 }}:{{ $p.service.port }}{{ end }}
{{- end -}}
{{- end -}}
