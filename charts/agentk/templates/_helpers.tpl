{{/* The chart's name, or nameOverride. */}}
{{- define "agentk.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-agentk (or fullnameOverride), at most 63 characters: every object's name. */}}
{{- define "agentk.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "agentk.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The immutable part: the Deployment's selector and what the Service and monitors select on. */}}
{{- define "agentk.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentk.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The standard labels, on every object. */}}
{{- define "agentk.labels" -}}
helm.sh/chart: {{ include "agentk.chart" . }}
{{ include "agentk.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: gitops-rs
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.additionalLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "agentk.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "agentk.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* kas's address: config.kasAddress, or chart 0.1's top-level kasAddress. */}}
{{- define "agentk.kasAddress" -}}
{{- $address := .Values.config.kasAddress | default .Values.kasAddress -}}
{{- $address = required "config.kasAddress is required: kas's grpc://, grpcs://, ws:// or wss:// address" $address -}}
{{- if not (regexMatch "^(grpc|grpcs|ws|wss)://" $address) -}}
{{- fail (printf "config.kasAddress %q must start with grpc://, grpcs://, ws:// or wss://" $address) -}}
{{- end -}}
{{- $address -}}
{{- end -}}

{{/* The Secret holding the agent token (key `token`): config.secretName, or the one the chart creates. */}}
{{- define "agentk.tokenSecretName" -}}
{{- .Values.config.secretName | default .Values.existingTokenSecret | default (printf "%s-token" (include "agentk.fullname" .)) -}}
{{- end -}}

{{/* Non-empty when the chart creates the token Secret itself. */}}
{{- define "agentk.createTokenSecret" -}}
{{- if not (.Values.config.secretName | default .Values.existingTokenSecret) -}}true{{- end -}}
{{- end -}}

{{/* The ConfigMap holding kas's CA bundle (key `ca.crt`), or empty for none. */}}
{{- define "agentk.caConfigMapName" -}}
{{- if .Values.config.kasCaCert -}}
{{- printf "%s-ca" (include "agentk.fullname" .) -}}
{{- else -}}
{{- .Values.caConfigMap -}}
{{- end -}}
{{- end -}}

{{/* Write access: "existing" (rbac.useExistingRole), "cluster" (write-all) or "namespace" (built-in admin here). */}}
{{- define "agentk.writeMode" -}}
{{- if .Values.rbac.useExistingRole -}}existing
{{- else if .Values.rbac.clusterWrite -}}cluster
{{- else -}}namespace
{{- end -}}
{{- end -}}
