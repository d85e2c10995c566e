#!/usr/bin/env bash
# Submit a release to `reactor serve` over HTTP and wait for it: a ReleaseRequested CloudEvent in structured mode,
# posted with curl, then the release polled until it ends. Needs bash, curl and jq.
#
#   REACTOR_URL=http://127.0.0.1:8000 REACTOR_TOKEN=<token> examples/ci/submit-release.sh release.json
#
# release.json is a release plan as JSON (the fields of a release file; `reactor release plan` checks one).
# Exit codes as the reactor CLI's: 0 completed, 1 failed (halted, aborted, rolled back) or refused,
# 2 invalid input, 3 waiting for a person (approval or resume).
#
# A release the workers refuse after accepting it over HTTP (a deploy policy that does not let this identity
# release it, a signature that does not verify) is never planned: after REACTOR_PLAN_TIMEOUT_S (default 120)
# seconds without a plan the script gives up with exit 1 and says where to look.
set -euo pipefail

plan=${1:?usage: submit-release.sh release.json}
url=${REACTOR_URL:-http://127.0.0.1:8000}
release_id=$(jq -er .release_id "$plan")
# The event id is stable for one release, so a retried job re-submits the same event (accepted again, not twice).
event_id=${REACTOR_EVENT_ID:-ci-$release_id}
source=${REACTOR_SOURCE:-/ci/submit-release}
auth=()
if [ -n "${REACTOR_TOKEN:-}" ]; then
  auth=(-H "Authorization: Bearer $REACTOR_TOKEN")
fi

event=$(jq -n --slurpfile plan "$plan" --arg id "$event_id" --arg source "$source" --arg release "$release_id" \
  --arg time "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  '{specversion: "1.0", id: $id, source: $source, type: "dev.deployreactor.release.requested.v1",
    subject: $release, correlationid: $release, time: $time, datacontenttype: "application/json",
    data: {plan: $plan[0]}}')

answer=$(mktemp)
trap 'rm -f "$answer"' EXIT
status=$(curl -sS -o "$answer" -w '%{http_code}' -X POST "${auth[@]}" \
  -H 'Content-Type: application/cloudevents+json' --data-binary "$event" "$url/api/v1/releases")
if [ "$status" != 202 ]; then
  echo "release $release_id refused ($status): $(cat "$answer")" >&2
  [ "$status" = 400 ] && exit 2
  exit 1
fi
echo "release $release_id submitted"

plan_deadline=$((SECONDS + ${REACTOR_PLAN_TIMEOUT_S:-120}))
while :; do
  status=$(curl -sS -o "$answer" -w '%{http_code}' "${auth[@]}" "$url/api/v1/releases/$release_id")
  case $status in
    200) state=$(jq -er .state "$answer") ;;
    404) # accepted, not planned yet: the pacer has not taken it up, or refused it
      if [ "$SECONDS" -ge "$plan_deadline" ]; then
        echo "release $release_id was accepted but not planned within ${REACTOR_PLAN_TIMEOUT_S:-120} s: the reactor" \
          "may have refused it (deploy policy, signature); its reason is on the dead-letter topic" \
          "(reactor replay --release $release_id)" >&2
        exit 1
      fi
      state=accepted ;;
    *) echo "reading release $release_id failed ($status): $(cat "$answer")" >&2; exit 1 ;;
  esac
  case $state in
    completed) echo "release $release_id: $state"; exit 0 ;;
    halted | aborted | rolled_back) echo "release $release_id: $state" >&2; exit 1 ;;
    awaiting_approval | paused) echo "release $release_id: $state"; exit 3 ;;
  esac
  sleep "${REACTOR_POLL_S:-2}"
done
