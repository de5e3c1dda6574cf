{{- define "kas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-kas (or fullnameOverride): every object's name. */}}
{{- define "kas.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (default .Chart.Name .Values.nameOverride) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kas.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kas.labels" -}}
helm.sh/chart: {{ include "kas.chart" . }}
{{ include "kas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: gitops-rs
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.additionalLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kas.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kas.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the chart creates for values given inline (adminToken, gitPassword, webhookSecret). */}}
{{- define "kas.inlineSecretName" -}}{{ printf "%s-secrets" (include "kas.fullname" .) }}{{- end -}}

{{/*
Where each secret file comes from, as a dict name -> {secret, key, value}; `value` set means the chart's own
Secret holds it. Order of precedence: the *SecretRef value, then existingSecret (chart 0.1: one Secret with
keys admin-token, git-password, webhook-secret), then the inline value. A missing git password means kas reads
Git anonymously.
*/}}
{{- define "kas.secretSources" -}}
{{- $v := .Values -}}
{{- $inline := include "kas.inlineSecretName" . -}}
{{- $out := dict -}}
{{- if $v.adminTokenSecretRef.name -}}
{{- $_ := set $out "admin-token" (dict "secret" $v.adminTokenSecretRef.name "key" $v.adminTokenSecretRef.key) -}}
{{- else if $v.existingSecret -}}
{{- $_ := set $out "admin-token" (dict "secret" $v.existingSecret "key" "admin-token") -}}
{{- else -}}
{{- $_ := set $out "admin-token" (dict "secret" $inline "key" "admin-token" "value" (required "adminToken (or adminTokenSecretRef.name, or existingSecret) is required: the admin API's bearer token" $v.adminToken)) -}}
{{- end -}}
{{- if $v.viewerTokenSecretRef.name -}}
{{- $_ := set $out "viewer-token" (dict "secret" $v.viewerTokenSecretRef.name "key" $v.viewerTokenSecretRef.key) -}}
{{- else if $v.viewerToken -}}
{{- $_ := set $out "viewer-token" (dict "secret" $inline "key" "viewer-token" "value" $v.viewerToken) -}}
{{- end -}}
{{- if $v.git.passwordSecretRef.name -}}
{{- $_ := set $out "git-password" (dict "secret" $v.git.passwordSecretRef.name "key" $v.git.passwordSecretRef.key) -}}
{{- else if and $v.existingSecret (not $v.git.anonymous) -}}
{{- $_ := set $out "git-password" (dict "secret" $v.existingSecret "key" "git-password") -}}
{{- else if and $v.gitPassword (not $v.git.anonymous) -}}
{{- $_ := set $out "git-password" (dict "secret" $inline "key" "git-password" "value" $v.gitPassword) -}}
{{- end -}}
{{- if $v.webhooks.enabled -}}
{{- if $v.webhooks.secretRef.name -}}
{{- $_ := set $out "webhook-secret" (dict "secret" $v.webhooks.secretRef.name "key" $v.webhooks.secretRef.key) -}}
{{- else if $v.existingSecret -}}
{{- $_ := set $out "webhook-secret" (dict "secret" $v.existingSecret "key" "webhook-secret") -}}
{{- else -}}
{{- $_ := set $out "webhook-secret" (dict "secret" $inline "key" "webhook-secret" "value" (required "webhookSecret (or webhooks.secretRef.name, or existingSecret) is required when webhooks.enabled" $v.webhookSecret)) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The Secret (type kubernetes.io/tls) serving the Kubernetes API proxy, or empty for plain http. */}}
{{- define "kas.k8sProxyTlsSecret" -}}
{{- if .Values.k8sProxy.tls.enabled -}}
{{- .Values.k8sProxy.tls.secretName | default .Values.agentTls.secretName -}}
{{- end -}}
{{- end -}}

{{/* The Git server's CA ConfigMap (key ca.crt), or empty. */}}
{{- define "kas.gitCaConfigMap" -}}
{{- if .Values.git.caCert -}}{{ printf "%s-git-ca" (include "kas.fullname" .) }}{{- else -}}{{ .Values.git.caConfigMap }}{{- end -}}
{{- end -}}
