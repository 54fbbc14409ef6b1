#!/usr/bin/env bash
# Build the web console's CodeMirror 6 bundle (api/console/assets/editor.js)
# from api/console/editor/ (entry.js + exactly pinned package.json/package-lock.json).
#
# The output is committed to the repository and embedded into the binary, so
# Node/npm are only needed when the editor is changed, never at run time.
#
# Usage:
#   scripts/build-console-editor.sh           rebuild api/console/assets/editor.js
#   scripts/build-console-editor.sh --check   build to a temp file and exit 1 if it
#                                             differs from the committed bundle
set -euo pipefail

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

check=0
case "${1:-}" in
    "") ;;
    --check) check=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-console-editor: unknown argument: $1" >&2; usage >&2; exit 2 ;;
esac
if [ "$#" -gt 1 ]; then
    echo "build-console-editor: too many arguments" >&2
    usage >&2
    exit 2
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
editor_dir="$repo_root/api/console/editor"
committed="$repo_root/api/console/assets/editor.js"

for tool in node npm npx; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build-console-editor: '$tool' not found; install Node.js and npm to rebuild the editor bundle" >&2
        exit 2
    fi
done

sha256() {
    sha256sum "$1" | cut -d' ' -f1
}

cd "$editor_dir"

# Install exactly what package-lock.json records (removes any existing node_modules).
npm ci --no-audit --no-fund

if [ "$check" -eq 1 ]; then
    tmp_dir="$(mktemp -d)"
    trap 'rm -rf "$tmp_dir"' EXIT
    outfile="$tmp_dir/editor.js"
else
    mkdir -p "$(dirname "$committed")"
    outfile="$committed"
fi

npx --no-install esbuild entry.js \
    --bundle \
    --minify \
    --format=iife \
    --target=es2020 \
    --legal-comments=eof \
    --log-level=warning \
    --outfile="$outfile"

size="$(wc -c <"$outfile" | tr -d ' ')"
hash="$(sha256 "$outfile")"

if [ "$check" -eq 1 ]; then
    if [ ! -f "$committed" ]; then
        echo "build-console-editor: CHECK FAILED: $committed does not exist; run scripts/build-console-editor.sh" >&2
        exit 1
    fi
    if ! cmp -s "$outfile" "$committed"; then
        echo "build-console-editor: CHECK FAILED: api/console/assets/editor.js is out of date" >&2
        echo "  committed: $(sha256 "$committed") ($(wc -c <"$committed" | tr -d ' ') bytes)" >&2
        echo "  rebuilt:   $hash ($size bytes)" >&2
        echo "  run scripts/build-console-editor.sh and commit the result" >&2
        exit 1
    fi
    echo "build-console-editor: OK, api/console/assets/editor.js is up to date"
    echo "sha256 $hash  api/console/assets/editor.js ($size bytes)"
else
    echo "sha256 $hash  api/console/assets/editor.js ($size bytes)"
fi
