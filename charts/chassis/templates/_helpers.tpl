{{/* Names and labels shared by every object of the chart. */}}

{{- define "chassis.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chassis.operator" -}}
{{- printf "%s-operator" (include "chassis.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chassis.metricsService" -}}
{{- printf "%s-metrics" (include "chassis.operator" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chassis.webhookService" -}}
{{- printf "%s-webhook" (include "chassis.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chassis.webhookSecret" -}}
{{- printf "%s-webhook-cert" (include "chassis.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chassis.labels" -}}
app.kubernetes.io/name: chassis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "chassis.selectorLabels" -}}
app.kubernetes.io/name: chassis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "chassis.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The webhook configurations' name; the operator's --webhook-inject-ca uses it. */}}
{{- define "chassis.webhookConfiguration" -}}
{{- printf "%s-tenancy" (include "chassis.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Project admission rules for the given operations (mutation: CREATE and UPDATE; validation: CREATE). */}}
{{- define "chassis.projectRules" -}}
- apiGroups: [tenancy.chassis.dev]
  apiVersions: [v1alpha1]
  resources: [projects]
  operations: {{ toJson . }}
  scope: Cluster
{{- end -}}

{{/* The mutating webhook's match condition (chassis_tenancy::admission::mutation_conditions): every create, and updates that change the requester annotation. */}}
{{- define "chassis.requesterChanged" -}}
{{- $key := "tenancy.chassis.dev/requester" -}}
{{- $of := "(has(%[1]s.metadata.annotations) && '%[2]s' in %[1]s.metadata.annotations ? 'set:' + %[1]s.metadata.annotations['%[2]s'] : 'unset')" -}}
{{- printf "request.operation != 'UPDATE' || %s != %s" (printf $of "object" $key) (printf $of "oldObject" $key) -}}
{{- end -}}

{{/* The controllers of the enabled areas, for --controllers. */}}
{{- define "chassis.controllers" -}}
{{- $controllers := list -}}
{{- if .Values.tenancy.enabled -}}
{{- $controllers = concat $controllers (list "project" "projecttemplate") -}}
{{- end -}}
{{- if .Values.network.enabled -}}
{{- $controllers = concat $controllers (list "networkprofile" "egresspolicy") -}}
{{- end -}}
{{- if not $controllers -}}
{{- fail "chassis: every area is disabled; enable at least one (for example tenancy.enabled=true or network.enabled=true)" -}}
{{- end -}}
{{- join "," $controllers -}}
{{- end -}}

{{/* The ValidatingAdmissionPolicy that keeps the operator's writes inside project namespaces. */}}
{{- define "chassis.operatorScope" -}}
{{- printf "%s-scope" (include "chassis.operator" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
