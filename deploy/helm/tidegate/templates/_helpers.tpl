{{/* Names and labels. */}}
{{- define "tidegate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tidegate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tidegate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tidegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tidegate.labels" -}}
{{ include "tidegate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: tidegate
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "tidegate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tidegate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tidegate.secretName" -}}
{{- default (printf "%s-secrets" (include "tidegate.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "tidegate.tlsSecretName" -}}
{{- if .Values.tls.create -}}
{{- printf "%s-tls" (include "tidegate.fullname" .) -}}
{{- else -}}
{{- required "tls.secretName: the kubernetes.io/tls Secret with the gateway's certificate" .Values.tls.secretName -}}
{{- end -}}
{{- end -}}

{{- define "tidegate.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The port of a listen address ("0.0.0.0:8443" -> 8443). */}}
{{- define "tidegate.port" -}}
{{- $port := regexFind "[0-9]+$" . -}}
{{- if not $port -}}
{{- fail (printf "%q has no port: write it as ADDRESS:PORT" .) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* Whole seconds of a duration written "30s", "2m" or "1500ms" (rounded up). */}}
{{- define "tidegate.seconds" -}}
{{- $d := toString . -}}
{{- if regexMatch "^[0-9]+s$" $d -}}
{{- trimSuffix "s" $d -}}
{{- else if regexMatch "^[0-9]+m$" $d -}}
{{- mul (trimSuffix "m" $d | int) 60 -}}
{{- else if regexMatch "^[0-9]+ms$" $d -}}
{{- div (add (trimSuffix "ms" $d | int) 999) 1000 -}}
{{- else -}}
{{- fail (printf "config.server.shutdown_grace_period %q: write it as seconds (\"30s\"), minutes (\"1m\") or milliseconds" $d) -}}
{{- end -}}
{{- end -}}

{{/*
A TOML value for a Helm value: strings and keys quoted (JSON's escapes are
TOML's), whole numbers without a fraction (Helm reads every number as a
float), lists as arrays, maps as inline tables.
*/}}
{{- define "tidegate.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "map" $v -}}
{ {{- $first := true -}}
{{- range $key, $item := $v -}}
{{- if not (kindIs "invalid" $item) -}}
{{- if not $first }}, {{ end -}}{{- $first = false -}}
{{ toJson $key }} = {{ include "tidegate.tomlValue" $item }}
{{- end -}}
{{- end -}} }
{{- else if kindIs "slice" $v -}}
[{{- range $i, $item := $v -}}{{- if $i }}, {{ end -}}{{ include "tidegate.tomlValue" $item }}{{- end -}}]
{{- else if kindIs "string" $v -}}
{{ toJson $v }}
{{- else if kindIs "bool" $v -}}
{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq (float64 (int64 $v)) (float64 $v) -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- else -}}
{{ $v }}
{{- end -}}
{{- end -}}

{{/* tidegate.toml from .Values.config, refusing secrets in it. */}}
{{- define "tidegate.toml" -}}
{{- $config := .Values.config -}}
{{- if and $config.queue (hasKey $config.queue "url") -}}
{{- fail "config.queue.url holds the broker's password: set secrets.amqpUrl (or a key of secrets.existingSecret) instead" -}}
{{- end -}}
{{- if and $config.admin (hasKey $config.admin "token") -}}
{{- fail "config.admin.token is a secret: set secrets.adminToken (or a key of secrets.existingSecret) instead" -}}
{{- end -}}
{{- if and $config.auth $config.auth.jwt (hasKey $config.auth.jwt "hs256_secret") -}}
{{- fail "config.auth.jwt.hs256_secret is a secret: set secrets.jwtSecret (or a key of secrets.existingSecret) instead" -}}
{{- end -}}
# Rendered by the tidegate Helm chart from .Values.config (README.md,
# Configuration, lists every key). Secrets come from environment variables.
{{- range $section, $keys := $config }}
{{- if not (regexMatch "^[a-z][a-z_]*$" $section) }}
{{- fail (printf "config.%q: a section of tidegate.toml is a plain name (server, queue, auth, ...); nest its tables as maps (config.auth.jwt)" $section) }}
{{- end }}
{{- if not (kindIs "map" $keys) }}
{{- fail (printf "config.%s: a section of tidegate.toml is a map of keys" $section) }}
{{- end }}

[{{ $section }}]
{{- range $key, $value := $keys }}
{{- if not (kindIs "invalid" $value) }}
{{ toJson $key }} = {{ include "tidegate.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
{{ end -}}
