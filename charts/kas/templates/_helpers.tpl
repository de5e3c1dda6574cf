{{- define "kas.fullname" -}}{{ .Release.Name }}-kas{{- end -}}
{{- define "kas.labels" -}}
app.kubernetes.io/name: kas
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "kas.secretName" -}}{{ default (printf "%s-secrets" (include "kas.fullname" .)) .Values.existingSecret }}{{- end -}}
