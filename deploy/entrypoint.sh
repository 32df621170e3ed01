#!/bin/sh
# Entry point of the medgate image. Docker's *_FILE convention for the one secret a variable must carry:
# PGPASSWORD_FILE names a file (a compose or Kubernetes secret) whose content becomes libpq's PGPASSWORD,
# so the review store's password is in neither the image, the command line nor MEDGATE_REVIEW_STORE_URL.
set -eu
if [ -n "${PGPASSWORD_FILE:-}" ]; then
    PGPASSWORD="$(cat "$PGPASSWORD_FILE")"
    export PGPASSWORD
    unset PGPASSWORD_FILE
fi
exec "$@"
