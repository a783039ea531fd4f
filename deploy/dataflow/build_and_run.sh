#!/usr/bin/env bash
# Build cm-beam's SDK container, register the Flex Template, and run the nightly on Dataflow.
#
#   deploy/dataflow/build_and_run.sh image      # build + push the container with Cloud Build
#   deploy/dataflow/build_and_run.sh template   # register the Flex Template (metadata.json)
#   deploy/dataflow/build_and_run.sh run [cm-nightly flags...]      # the nightly (driver here)
#   deploy/dataflow/build_and_run.sh dry-run    # translate each stage for Dataflow, submit nothing
#
# Settings (environment): PROJECT, REGION, BUCKET (gs://... without trailing slash),
# REPO (Artifact Registry repository, default cm-beam), TAG (default: the git commit),
# SERVICE_ACCOUNT (optional worker service account), POOL, MODEL, EXCLUDE, BATCH_SIZE.
#
# `run` starts cm-nightly as the driver on this machine (or a CI runner, a Cloud Run job,
# the CronJob in deploy/k8s): it submits one Dataflow job per stage, waits for each, and
# writes each stage's manifest when its job is DONE. Workers run the container, so they
# hold exactly this package and its dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET (gs://...)}"
REPO="${REPO:-cm-beam}"
TAG="${TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo latest)}"
IMAGE="${REGION}-docker.pkg.dev/${PROJECT}/${REPO}/cm-beam:${TAG}"
TEMPLATE="${BUCKET}/templates/cm-nightly-${TAG}.json"
PYTHON="${PYTHON:-python3}"

dataflow_flags=(
  --runner=DataflowRunner
  --project="${PROJECT}"
  --region="${REGION}"
  --temp_location="${BUCKET}/tmp"
  --staging_location="${BUCKET}/staging"
  --sdk_container_image="${IMAGE}"
  --sdk_location=container
  --experiments=use_runner_v2
  --job_name=cm-nightly-$(date -u +%Y%m%d-%H%M%S)
)
if [[ -n "${SERVICE_ACCOUNT:-}" ]]; then
  dataflow_flags+=(--service_account_email="${SERVICE_ACCOUNT}")
fi

case "${1:-}" in
  image)
    gcloud artifacts repositories describe "${REPO}" --location="${REGION}" --project="${PROJECT}" >/dev/null 2>&1 \
      || gcloud artifacts repositories create "${REPO}" --repository-format=docker --location="${REGION}" --project="${PROJECT}"
    # Cloud Build reads the Dockerfile path from a config; the context is the repository root.
    cat > /tmp/cm-beam-cloudbuild.yaml <<YAML
steps:
- name: gcr.io/cloud-builders/docker
  args: [build, -f, deploy/dataflow/Dockerfile, -t, "${IMAGE}", .]
images: ["${IMAGE}"]
YAML
    gcloud builds submit --project="${PROJECT}" --region="${REGION}" --config=/tmp/cm-beam-cloudbuild.yaml .
    echo "image: ${IMAGE}"
    ;;
  template)
    gcloud dataflow flex-template build "${TEMPLATE}" \
      --project="${PROJECT}" \
      --image="${IMAGE}" \
      --sdk-language=PYTHON \
      --metadata-file=deploy/dataflow/metadata.json
    echo "template: ${TEMPLATE} (see deploy/dataflow/README.md before launching it)"
    ;;
  run)
    shift
    args=(--pool="${POOL:?set POOL}" --model="${MODEL:?set MODEL}" --work_dir="${BUCKET}/cm-work"
          --batch_size="${BATCH_SIZE:-100000}")
    if [[ -n "${EXCLUDE:-}" ]]; then args+=(--exclude="${EXCLUDE}"); fi
    exec "${PYTHON}" -m pipelines.nightly "${args[@]}" "${dataflow_flags[@]}" "$@"
    ;;
  dry-run)
    # Each stage's pipeline is built for Dataflow (validated, translated to the job proto)
    # without credentials and without submitting: tests/test_runners_dataflow.py does the same.
    "${PYTHON}" -m pytest -q tests/test_runners_dataflow.py
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
