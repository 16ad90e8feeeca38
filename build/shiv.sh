#!/usr/bin/env bash
# Build dist/stagerd: one executable zipapp (shiv) holding stagerd and its locked
# dependencies, copied to hosts like a Go binary. Same inputs, same bytes.
#
# Usage: build/shiv.sh [options]
#   -o, --output PATH       artifact path (default dist/stagerd; PATH.sha256 is written beside it)
#   --python-version X.Y    target CPython minor version (default: the build Python's)
#   --platform TAG          wheel platform tag, repeatable (default manylinux2014_$(uname -m))
#   --interpreter CMD       shebang command (default "/usr/bin/env python3"), e.g. /usr/bin/python3.10
#   --work DIR              scratch directory (default build/work)
#   --aws-services LIST     botocore service models to keep, comma-separated (default s3; "all")
#   --print-build-id        print the build id of these inputs and exit (nothing is built)
#   --lock                  re-resolve build/requirements.lock from pyproject.toml and exit
# Environment:
#   BUILD_PYTHON       interpreter with pip, packaging and shiv (default: the project venv if it
#                      has them, else build/work/buildenv, created from build/build-requirements.txt)
#   SOURCE_DATE_EPOCH  timestamp of every zip entry (default: the last commit's time)
#   STAGERD_WHEELHOUSE where the target's locked wheels are kept (default build/work/wheels)
#
# The artifact unpacks its libraries under $SHIV_ROOT (default ~/.shiv; the systemd units
# point it at CacheDirectory=) once per build id, and prunes other builds' unpacked copies
# that no running process holds (build/shiv-preamble.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
lock="$here/requirements.lock"

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { printf 'shiv.sh: %s\n' "$*" >&2; exit 2; }

output="$root/dist/stagerd"
python_version=""
platforms=()
interpreter="/usr/bin/env python3"
work_root="$here/work"
aws_services="s3"
action=build
while [ $# -gt 0 ]; do
    case "$1" in
        -o|--output) output="$2"; shift 2 ;;
        --python-version) python_version="$2"; shift 2 ;;
        --platform) platforms+=("$2"); shift 2 ;;
        --interpreter) interpreter="$2"; shift 2 ;;
        --work) work_root="$2"; shift 2 ;;
        --aws-services) aws_services="$2"; shift 2 ;;
        --print-build-id) action=print-id; shift ;;
        --lock) action=lock; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

# The build interpreter needs pip, packaging and the pinned shiv. The project venv has
# them once build/venv.sh ran; on a fresh clone this script makes a small build venv of
# its own (build/work/buildenv) rather than failing on the system Python.
has_tools() { [ -x "$1" ] && "$1" -c 'import shiv, packaging, pip' 2>/dev/null; }
py="${BUILD_PYTHON:-}"
if [ -n "$py" ]; then
    has_tools "$py" || die "BUILD_PYTHON=$py lacks shiv, packaging or pip"
elif has_tools "${STAGERD_VENV:-$root/.venv}/bin/python"; then
    py="${STAGERD_VENV:-$root/.venv}/bin/python"
else
    py="$work_root/buildenv/bin/python"
    if ! has_tools "$py"; then
        system_python="${PYTHON:-python3}"
        command -v "$system_python" >/dev/null || die "no python3 found: set BUILD_PYTHON"
        echo "shiv.sh: preparing the build environment $work_root/buildenv" >&2
        rm -rf "$work_root/buildenv"
        "$system_python" -m venv "$work_root/buildenv" ||
            die "could not create a venv with $system_python (Debian: apt-get install python3-venv)"
        "$py" -m pip install --quiet --disable-pip-version-check -r "$here/build-requirements.txt" ||
            die "could not install $here/build-requirements.txt into the build environment"
    fi
fi
tool() { "$py" "$here/shivtool.py" "$@"; }

if [ "$action" = lock ]; then
    tool lock "$lock"
    echo "shiv.sh: wrote $lock" >&2
    exit 0
fi

[ -n "$python_version" ] || python_version="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$python_version" =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.12, got $python_version"
[ ${#platforms[@]} -gt 0 ] || platforms=("manylinux2014_$(uname -m)")
shiv_version="$("$py" -m shiv --version | awk '{print $NF}')"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 315532800)"
fi
export SOURCE_DATE_EPOCH
target_json="$("$py" - "$python_version" "$interpreter" "$shiv_version" "$SOURCE_DATE_EPOCH" \
    "$aws_services" "${platforms[@]}" <<'EOF'
import json, sys
version, interpreter, shiv, epoch, aws, *platforms = sys.argv[1:]
print(json.dumps({"python_version": version, "interpreter": interpreter, "shiv": shiv,
                  "source_date_epoch": int(epoch), "aws_services": aws,
                  "platforms": platforms}, sort_keys=True))
EOF
)"
build_id="$(tool build-id "$lock" "$target_json")" || exit 2
if [ "$action" = print-id ]; then
    echo "$build_id"
    exit 0
fi

version="$(tool version)"
code_version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$root/stagerd/__init__.py")"
[ "$version" = "$code_version" ] ||
    die "pyproject.toml version $version != stagerd.__version__ $code_version"
work="$work_root/$build_id.$$"
site="$work/site-packages"
trap 'rm -rf "$work"' EXIT
rm -rf "$work"
mkdir -p "$site"
umask 022

echo "shiv.sh: stagerd $version build $build_id for CPython $python_version on ${platforms[*]}" >&2
tool select "$lock" "$python_version" >"$work/pins.txt"
target_args=(--only-binary=:all: --implementation cp --abi "cp${python_version/./}"
    --python-version "$python_version")
for p in "${platforms[@]}"; do target_args+=(--platform "$p"); done
# The target's wheels are downloaded once into a wheelhouse and installed from there
# without asking an index again: a rebuild then takes seconds, and only the lock, never
# an index's current state, decides what goes in. --no-deps: the lock is already the
# complete, resolved set for this target.
wheelhouse="${STAGERD_WHEELHOUSE:-$here/work/wheels}/$python_version-$(printf '%s\n' "${platforms[@]}" | sha256sum | cut -c1-12)"
if ! cmp -s "$work/pins.txt" "$wheelhouse/.pins" 2>/dev/null; then
    mkdir -p "$wheelhouse"
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps "${target_args[@]}" \
        --dest "$wheelhouse" -r "$work/pins.txt"
    cp "$work/pins.txt" "$wheelhouse/.pins"
fi
"$py" -m pip install --isolated --quiet --disable-pip-version-check --no-deps --no-compile \
    --no-index --find-links "$wheelhouse" --target "$site" "${target_args[@]}" \
    -r "$work/pins.txt"

# Which import names each pin provides, read from the RECORDs before they are dropped:
# the artifact checks at start-up that its running Python finds every one it needs.
requires_json="$(tool requires "$lock" "$python_version" "$site")"

# botocore ships the models of ~450 AWS services (2,000 files, 28 MB); stagerd talks to S3
# only. Every zip entry costs start time (shiv and zipimport read the whole directory on
# each start), so keep just the models used.
if [ "$aws_services" != all ]; then
    for model_dir in "$site"/botocore/data/*/ "$site"/boto3/data/*/; do
        [ -d "$model_dir" ] || continue
        [[ ",$aws_services," == *",$(basename "$model_dir"),"* ]] || rm -rf "$model_dir"
    done
fi
# Drop what would make the bytes depend on the build host: console scripts carry this
# machine's interpreter path in their shebang, and RECORD lists their hashes.
rm -rf "$site/bin"
find "$site" -path '*.dist-info/RECORD' -delete
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +

tool stage-package "$site"
tool stamp "$site/stagerd/_build.py" "$("$py" - "$build_id" "$version" "$python_version" \
    "$SOURCE_DATE_EPOCH" "$(git -C "$root" rev-parse HEAD 2>/dev/null || true)" "$requires_json" \
    "${platforms[@]}" <<'EOF'
import json, sys
build_id, version, python_version, epoch, commit, requires, *platforms = sys.argv[1:]
print(json.dumps({"BUILD_ID": build_id, "VERSION": version, "GIT_COMMIT": commit,
                  "SOURCE_DATE_EPOCH": int(epoch), "PYTHON_VERSION": python_version,
                  "PLATFORMS": platforms, "REQUIRES": json.loads(requires)}))
EOF
)"
cp "$here/shiv-preamble.py" "$work/stagerd-preamble.py"
# Modes go into the zip: make them independent of the builder's umask and checkout.
find "$site" -type d -exec chmod 0755 {} +
find "$site" "$work/stagerd-preamble.py" -type f -exec chmod 0644 {} +

mkdir -p "$(dirname "$output")"
tmp_out="$output.tmp.$$"
"$py" -m shiv --site-packages "$site" --entry-point stagerd.cli:main \
    --output-file "$tmp_out" --python "$interpreter" --build-id "$build_id" \
    --reproducible --compressed --compile-pyc --preamble "$work/stagerd-preamble.py" >"$work/shiv.log" 2>&1 ||
    { cat "$work/shiv.log" >&2; rm -f "$tmp_out"; exit 1; }
chmod 0755 "$tmp_out"
mv -f "$tmp_out" "$output"
sum="$(sha256sum "$output" | awk '{print $1}')"
printf '%s  %s\n' "$sum" "$(basename "$output")" >"$output.sha256"
echo "shiv.sh: wrote $output ($(stat -c %s "$output") bytes, sha256 $sum)" >&2
