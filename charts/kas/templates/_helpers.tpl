{{- define "kas.fullname" -}}{{ .Release.Name }}-kas{{- end -}}
{{- define "kas.labels" -}}
app.kubernetes.io/name: kas
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "kas.secretName" -}}{{ default (printf "%s-secrets" (include "kas.fullname" .)) .Values.existingSecret }}{{- end -}}
{{- /* Non-empty when kas should authenticate to the Git server (a password file is rendered). */ -}}
{{- define "kas.gitCredentials" -}}
{{- if .Values.existingSecret -}}{{- if not .Values.git.anonymous -}}true{{- end -}}
{{- else if .Values.gitPassword -}}true{{- end -}}
{{- end -}}
