{{/*
Chart name, truncated for label values.
*/}}
{{- define "waybill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: the prefix of every resource name. Truncated to 35 characters (not the
usual 63) so that every derived name fits its limit untruncated: <fullname>-<service>-headless
within a 63-character DNS label (the schema caps service names at 18 characters), and the
StatefulSet <fullname>-postgres-replica within 52 (its pods get a controller-revision-hash
label of name + 11 characters, and label values stop at 63).
*/}}
{{- define "waybill.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 35 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 35 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 35 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "waybill.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "waybill.labels" -}}
helm.sh/chart: {{ include "waybill.chart" . }}
{{ include "waybill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: waybill
{{- end }}

{{/*
Selector labels shared by everything of one release.
*/}}
{{- define "waybill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "waybill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component (a service name, migrate, postgres-primary, postgres-replica, nats).
Usage: include "waybill.componentLabels" (dict "root" $ "component" "orders")
*/}}
{{- define "waybill.componentLabels" -}}
{{ include "waybill.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Selector labels of one component; the NetworkPolicies select callers' pods with them too.
Usage: include "waybill.componentSelectorLabels" (dict "root" $ "component" "orders")
*/}}
{{- define "waybill.componentSelectorLabels" -}}
{{ include "waybill.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The waybill image reference: repository@digest when a digest is set, else repository:tag.
*/}}
{{- define "waybill.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Merges map .src into map .dst in place, recursively: maps merge key by key, null removes the
key (as in Helm's own values), anything else (scalars, lists, false, 0) replaces. Sprig's
merge/mergeOverwrite are not used because they treat false and 0 as "empty" and would let a
default `enabled: true` win over a service's `enabled: false`.
*/}}
{{- define "waybill.mergeInto" -}}
{{- $dst := .dst }}
{{- range $key, $value := .src }}
{{- if kindIs "invalid" $value }}
{{- $_ := unset $dst $key }}
{{- else if and (kindIs "map" $value) (kindIs "map" (get $dst $key)) }}
{{- include "waybill.mergeInto" (dict "dst" (get $dst $key) "src" $value) }}
{{- else }}
{{- $_ := set $dst $key $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The enabled services with serviceDefaults merged in, as YAML: name -> effective settings.
Also checks what the schema cannot: callers name existing services, autoscaling bounds.
Usage: $services := include "waybill.services" . | fromYaml
*/}}
{{- define "waybill.services" -}}
{{- $all := .Values.services | default dict }}
{{- $out := dict }}
{{- range $name, $service := $all }}
{{- if or (not (hasKey $service "enabled")) $service.enabled }}
{{- $settings := deepCopy $.Values.serviceDefaults }}
{{- include "waybill.mergeInto" (dict "dst" $settings "src" $service) }}
{{- range $caller := $settings.callers }}
{{- if not (hasKey $all $caller) }}
{{- fail (printf "services.%s.callers: %q is not a key of services" $name $caller) }}
{{- end }}
{{- end }}
{{- if and $settings.autoscaling.enabled (gt (int $settings.autoscaling.minReplicas) (int $settings.autoscaling.maxReplicas)) }}
{{- fail (printf "services.%s.autoscaling: minReplicas (%v) is larger than maxReplicas (%v)" $name $settings.autoscaling.minReplicas $settings.autoscaling.maxReplicas) }}
{{- end }}
{{- $pdb := $settings.podDisruptionBudget }}
{{- if eq (len (pick $pdb "maxUnavailable" "minAvailable")) 1 | not }}
{{- fail (printf "services.%s.podDisruptionBudget: set exactly one of maxUnavailable and minAvailable (set the inherited one to null to switch)" $name) }}
{{- end }}
{{- $_ := set $out $name $settings }}
{{- end }}
{{- end }}
{{- range $name, $settings := $out }}
{{- range $callee := $settings.calls }}
{{- if not (hasKey $out $callee) }}
{{- fail (printf "services.%s.calls: %q is not an enabled service (enable services.%s, or drop it from calls and point %s at it with extraEnv)" $name $callee $callee (include "waybill.targetEnvName" $callee)) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
Name of the variable that tells a service where another one is: WAYBILL_<CALLEE>_TARGET
(--inventory-target is WAYBILL_INVENTORY_TARGET).
Usage: include "waybill.targetEnvName" "inventory"
*/}}
{{- define "waybill.targetEnvName" -}}
{{- printf "WAYBILL_%s_TARGET" (. | replace "-" "_" | upper) }}
{{- end }}

{{/*
The target a caller is given for one service: its headless Service by fully qualified name, so
the client resolves every ready pod and balances per call (p2c), re-resolving every 5 s.
Usage: include "waybill.serviceTarget" (dict "root" $ "name" "inventory")
*/}}
{{- define "waybill.serviceTarget" -}}
{{- printf "dns://%s.%s.svc.%s:50051" (include "waybill.headlessServiceName" .) .root.Release.Namespace .root.Values.clusterDomain }}
{{- end }}

{{/*
Who may call whom, from callers and calls together: name -> {"callers": [...], "callees": [...]}
over the enabled services. A service's callers are its declared callers plus every service that
lists it in calls; its callees are its calls plus every service that lists it among callers.
Usage: $graph := include "waybill.callGraph" (dict "services" $services) | fromYaml
*/}}
{{- define "waybill.callGraph" -}}
{{- $services := .services }}
{{- $out := dict }}
{{- range $name, $svc := $services }}
{{- $callers := $svc.callers | default list }}
{{- $callees := $svc.calls | default list }}
{{- range $other, $otherSvc := $services }}
{{- if has $name ($otherSvc.calls | default list) }}
{{- $callers = append $callers $other }}
{{- end }}
{{- if has $name ($otherSvc.callers | default list) }}
{{- $callees = append $callees $other }}
{{- end }}
{{- end }}
{{- $_ := set $out $name (dict "callers" ($callers | uniq | sortAlpha) "callees" ($callees | uniq | sortAlpha)) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
Name of one service's Deployment, ClusterIP Service, ConfigMap, PDB, HPA and NetworkPolicy.
Usage: include "waybill.serviceFullname" (dict "root" $ "name" "orders")
*/}}
{{- define "waybill.serviceFullname" -}}
{{- printf "%s-%s" (include "waybill.fullname" .root) .name }}
{{- end }}

{{/*
Name of one service's headless Service: the DNS name clients balance over
(dns:///<this>:50051).
*/}}
{{- define "waybill.headlessServiceName" -}}
{{- printf "%s-%s-headless" (include "waybill.fullname" .root) .name }}
{{- end }}

{{/*
The Secret with keys primary-url and (optional) replica-urls: the generated one when the
bundled Postgres is on, else database.existingSecret (required; the schema says so too, this
covers --skip-schema-validation).
*/}}
{{- define "waybill.databaseSecretName" -}}
{{- if .Values.postgresql.enabled }}
{{- printf "%s-postgres" (include "waybill.fullname" .) }}
{{- else }}
{{- required "database.existingSecret is required when postgresql.enabled is false: name a Secret with keys primary-url and replica-urls" .Values.database.existingSecret }}
{{- end }}
{{- end }}

{{/*
Bundled Postgres: client Services (ClusterIP) of the primary and the replica.
*/}}
{{- define "waybill.postgresPrimaryHost" -}}
{{- printf "%s-postgres-primary" (include "waybill.fullname" .) }}
{{- end }}
{{- define "waybill.postgresReplicaHost" -}}
{{- printf "%s-postgres-replica" (include "waybill.fullname" .) }}
{{- end }}

{{/*
The event bus (WAYBILL_EVENT_BUS): eventBus.type when set, else nats when NATS is configured
(the bundled one or eventBus.nats.url), else postgres. Fails on a contradiction the schema
cannot express as clearly.
*/}}
{{- define "waybill.eventBus" -}}
{{- $natsConfigured := or .Values.nats.enabled .Values.eventBus.nats.url }}
{{- $type := .Values.eventBus.type | default (ternary "nats" "postgres" (not (not $natsConfigured))) }}
{{- if and (eq $type "nats") (not $natsConfigured) }}
{{- fail "eventBus.type is nats: set nats.enabled (the bundled NATS) or eventBus.nats.url (your own)" }}
{{- end }}
{{- $type }}
{{- end }}

{{/*
NATS client URL(s) of the event bus: eventBus.nats.url, else the bundled NATS Service.
*/}}
{{- define "waybill.natsUrl" -}}
{{- if .Values.eventBus.nats.url }}
{{- .Values.eventBus.nats.url }}
{{- else }}
{{- printf "nats://%s-nats.%s.svc.%s:4222" (include "waybill.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}
{{- end }}

{{/*
The client ports of eventBus.nats.url (NATS' default 4222 where a URL names none), as a JSON
list, for the NetworkPolicy egress rule.
*/}}
{{- define "waybill.externalNatsPorts" -}}
{{- $ports := list }}
{{- range $url := splitList "," .Values.eventBus.nats.url }}
{{- $port := regexFind ":[0-9]+$" (urlParse (trim $url)).host | trimPrefix ":" | default "4222" }}
{{- $ports = append $ports (int $port) }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}

{{/*
Container securityContext of the bundled Postgres containers: the image's own postgres user
(999), so initdb and pg_basebackup find a passwd entry; the root filesystem stays read-only
(PGDATA is a volume, /var/run/postgresql and /tmp are emptyDirs).
*/}}
{{- define "waybill.postgresSecurityContext" -}}
runAsNonRoot: true
runAsUser: 999
runAsGroup: 999
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Pod securityContext of the bundled Postgres pods.
*/}}
{{- define "waybill.postgresPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: 999
runAsGroup: 999
fsGroup: 999
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}
