#!/usr/bin/env bash
# Regenerate patches/upstream/SHA256SUMS over every file under patches/upstream (the pinned
# upstream copies and the folder's README). Run it after adding or changing a pinned copy;
# tests/test_patches.py checks that every file is listed and unmodified.
set -euo pipefail
cd "$(dirname "$0")/../patches/upstream"
find . -type f ! -name SHA256SUMS ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum > SHA256SUMS
echo "patches/upstream/SHA256SUMS: $(wc -l < SHA256SUMS) files"
