{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "pairdots.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "pairdots.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pairdots.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "pairdots.labels" -}}
helm.sh/chart: {{ include "pairdots.chart" . }}
{{ include "pairdots.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pairdots
{{- end }}

{{/* Selector labels of the server pods. */}}
{{- define "pairdots.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pairdots.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pairdots.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pairdots.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The server image: repository:tag or repository@digest; refuses "latest". */}}
{{- define "pairdots.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString }}
{{- if eq $tag "latest" }}
{{- fail "image.tag must be a pinned version, not \"latest\": set image.tag (or image.digest)" }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Path of the jobs DB. */}}
{{- define "pairdots.jobsDb" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.state.mountPath) .Values.state.jobsDbFile }}
{{- end }}

{{/* The shared job store's Secret ("" = SQLite in the state volume). */}}
{{- define "pairdots.jobsSecret" -}}
{{- if .Values.jobs.existingSecret }}{{ .Values.jobs.existingSecret }}{{ else if .Values.jobs.db }}{{ printf "%s-jobs-db" (include "pairdots.fullname" .) }}{{ end }}
{{- end }}

{{/* --jobs-db argument: the PostgreSQL URL from the Secret (env PAIRDOTS_JOBS_DB_URL,
     expanded by the kubelet) or the SQLite file in the state volume. */}}
{{- define "pairdots.jobsDbArg" -}}
{{- if include "pairdots.jobsSecret" . }}--jobs-db=$(PAIRDOTS_JOBS_DB_URL){{ else }}--jobs-db={{ include "pairdots.jobsDb" . }}{{ end }}
{{- end }}

{{/* Env var carrying the PostgreSQL URL (nothing with SQLite). */}}
{{- define "pairdots.jobsDbEnv" -}}
{{- with include "pairdots.jobsSecret" . }}
- name: PAIRDOTS_JOBS_DB_URL
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.jobs.secretKey }}
{{- end }}
{{- end }}

{{/* Tracing flags shared by serve and worker. */}}
{{- define "pairdots.telemetryArgs" -}}
{{- if .Values.telemetry.otlpEndpoint }}
- --otlp-endpoint={{ .Values.telemetry.otlpEndpoint }}
- --trace-sample-ratio={{ .Values.telemetry.sampleRatio }}
{{- if .Values.telemetry.otlpTls }}
- --otlp-tls
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the claim holding the state (jobs DB); only with state.persistence. */}}
{{- define "pairdots.stateClaim" -}}
{{- default (printf "%s-state" (include "pairdots.fullname" .)) .Values.state.persistence.existingClaim }}
{{- end }}

{{/* Name of the claim holding the index-build parts. */}}
{{- define "pairdots.partsClaim" -}}
{{- default (printf "%s-index-parts" (include "pairdots.fullname" .)) .Values.indexBuild.parts.existingClaim }}
{{- end }}

{{/* Claim holding bundles for the index-build Jobs. */}}
{{- define "pairdots.indexBundlesClaim" -}}
{{- default .Values.bundles.pvc.claimName .Values.indexBuild.bundlesClaim }}
{{- end }}

{{/* Port the kubelet probes: the plaintext health port if set, else the gRPC port. */}}
{{- define "pairdots.probePort" -}}
{{- if gt (int .Values.server.healthPort) 0 }}{{ .Values.server.healthPort }}{{ else }}{{ .Values.server.port }}{{ end }}
{{- end }}

{{/* Environment shared by every pairdots container: offline hub, writable caches. */}}
{{- define "pairdots.commonEnv" -}}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.cache.mountPath | quote }}
- name: XDG_CACHE_HOME
  value: {{ .Values.cache.mountPath | quote }}
- name: TORCH_HOME
  value: {{ printf "%s/torch" .Values.cache.mountPath | quote }}
- name: CUDA_CACHE_PATH
  value: {{ printf "%s/nv" .Values.cache.mountPath | quote }}
- name: TRITON_CACHE_DIR
  value: {{ printf "%s/triton" .Values.cache.mountPath | quote }}
- name: TMPDIR
  value: /tmp
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{/* Writable scratch volume mounts shared by every pairdots container. */}}
{{- define "pairdots.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- end }}

{{/* Writable scratch volumes (emptyDir) backing pairdots.scratchMounts. */}}
{{- define "pairdots.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.cache.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- end }}

{{/* Checks that combine several values; each message says what to change. */}}
{{- define "pairdots.validate" -}}
{{- if not (has .Values.bundles.source (list "pvc" "fetch")) }}
{{- fail (printf "bundles.source must be \"pvc\" or \"fetch\", got %q" .Values.bundles.source) }}
{{- end }}
{{- if and (eq .Values.bundles.source "pvc") (not .Values.bundles.pvc.claimName) }}
{{- fail "bundles.source=pvc needs bundles.pvc.claimName (an existing PersistentVolumeClaim with the bundles)" }}
{{- end }}
{{- if and (eq .Values.bundles.source "fetch") (not .Values.bundles.fetch.uri) }}
{{- fail "bundles.source=fetch needs bundles.fetch.uri (e.g. s3://bucket/pairdots/bundles)" }}
{{- end }}
{{- if not (has .Values.server.device (list "auto" "cpu" "cuda")) }}
{{- fail (printf "server.device must be auto, cpu or cuda, got %q" .Values.server.device) }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with tls.crt and tls.key)" }}
{{- end }}
{{- if and .Values.tls.enabled (eq (int .Values.server.healthPort) 0) }}
{{- fail "tls.enabled needs server.healthPort > 0: kubelet gRPC probes cannot use TLS, so health is probed on a plaintext health-only port" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
{{- fail "auth.enabled needs auth.existingSecret (a Secret whose key auth.key holds the tokens file)" }}
{{- end }}
{{- if and .Values.worker.enabled (not (include "pairdots.jobsSecret" .)) }}
{{- fail "worker.enabled needs a shared job store: set jobs.db (a postgresql:// URL) or jobs.existingSecret; workers cannot share the per-pod SQLite file" }}
{{- end }}
{{- if and .Values.jobs.db (not (hasPrefix "postgresql://" .Values.jobs.db)) (not (hasPrefix "postgres://" .Values.jobs.db)) }}
{{- fail "jobs.db must be a postgresql:// URL (leave it empty for the per-pod SQLite store)" }}
{{- end }}
{{- if and .Values.state.persistence.enabled (not (include "pairdots.jobsSecret" .)) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "state.persistence.enabled needs replicaCount=1 and autoscaling.enabled=false: the jobs DB is SQLite (a single writer). Keep persistence off (emptyDir) for several replicas" }}
{{- end }}
{{- if and .Values.indexBuild.enabled (lt (int .Values.indexBuild.shards) 1) }}
{{- fail "indexBuild.shards must be >= 1" }}
{{- end }}
{{- if and .Values.indexBuild.enabled (not (include "pairdots.indexBundlesClaim" .)) }}
{{- fail "indexBuild.enabled needs indexBuild.bundlesClaim or bundles.pvc.claimName (the claim holding the bundle to index)" }}
{{- end }}
{{- if and .Values.indexBuild.enabled (not (has .Values.indexBuild.device (list "cpu" "cuda"))) }}
{{- fail (printf "indexBuild.device must be cpu or cuda, got %q" .Values.indexBuild.device) }}
{{- end }}
{{- end }}

{{/* The bundle fetch initContainer (bundles.source=fetch) of the server and worker pods. */}}
{{- define "pairdots.fetchInit" -}}
{{- if eq .Values.bundles.source "fetch" }}
initContainers:
  - name: fetch-bundles
    image: {{ printf "%s:%s" .Values.bundles.fetch.image.repository (toString .Values.bundles.fetch.image.tag) }}
    imagePullPolicy: {{ .Values.bundles.fetch.image.pullPolicy }}
    command:
      {{- toYaml .Values.bundles.fetch.command | nindent 6 }}
    args:
      {{- toYaml .Values.bundles.fetch.args | nindent 6 }}
    env:
      - name: BUNDLES_URI
        value: {{ .Values.bundles.fetch.uri | quote }}
      - name: BUNDLES_DIR
        value: {{ .Values.bundles.mountPath | quote }}
      - name: HOME
        value: /tmp
      {{- with .Values.bundles.fetch.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with .Values.bundles.fetch.envFromSecret }}
    envFrom:
      - secretRef:
          name: {{ . }}
    {{- end }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    resources:
      {{- toYaml .Values.bundles.fetch.resources | nindent 6 }}
    volumeMounts:
      - name: bundles
        mountPath: {{ .Values.bundles.mountPath }}
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end }}
