#!/usr/bin/env bash
# The whole test suite, as CI runs it: venv, services, lint, types, tests.
# Extra arguments go to pytest (e.g. build/test.sh -k transfer -x).
# STAGERD_FULL=1 also runs the long reliability runs marked slow.
# The interop tests run against SeaweedFS, moto and two OpenStack Swift releases
# (build/swift.sh); STAGERD_TEST_S3_SERVERS=seaweedfs,moto skips Swift.
# STAGERD_TEST_JOBS sets pytest-xdist's worker count (default 3: most tests wait on I/O).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
export STAGERD_VENV="${STAGERD_VENV:-$root/.venv}"
cd "$root"
"$here/venv.sh"
"$here/services.sh"
export STAGERD_TEST_S3_SERVERS="${STAGERD_TEST_S3_SERVERS:-seaweedfs,moto,swift,swift-old}"
if [[ "$STAGERD_TEST_S3_SERVERS" == *swift* ]]; then
    echo "== swift all-in-one (current and old release)" >&2
    eval "$("$here/swift.sh" start all)"
fi
py="$STAGERD_VENV/bin/python"
echo "== ruff" >&2
"$py" -m ruff check stagerd tests bench
echo "== mypy (strict on stagerd/)" >&2
"$py" -m mypy
echo "== pytest" >&2
# The VM test (marker vm) boots QEMU guests: build/vmtest.sh runs it, never this script.
markers=(-m "not vm")
[ "${STAGERD_FULL:-0}" = 1 ] || markers=(-m "not slow and not vm")
exec "$py" -m pytest -n "${STAGERD_TEST_JOBS:-3}" "${markers[@]}" "$@"
